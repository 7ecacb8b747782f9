//! `index.html` of a run: the summary, latency and throughput over time with the fault periods
//! shaded (SVG, drawn with plotters), the faults, and for anomalies the operations of the keys
//! involved, taken from the history around the line each checker names.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::{FaultRecord, RunOptions, FINAL_PROCESS};
use crate::history::{operations, Event, EventType, Outcome};

/// Points of one outcome drawn at most; beyond that every n-th is drawn (the file stays small,
/// and failed or unknown operations, usually few, are all drawn).
const POINTS_PER_OUTCOME_MAX: usize = 25_000;
/// History lines shown around each anomaly, for the key it concerns.
const CONTEXT_EVENTS: usize = 12;
/// Anomalies shown with their history (all are in the checker output below them).
const ANOMALIES_SHOWN_MAX: usize = 50;

/// One completed operation: when it completed (s), its latency (ms), and how it ended.
pub(crate) struct Sample {
    at_s: f64,
    latency_ms: f64,
    outcome: Outcome,
}

pub(crate) fn samples(events: &[Event]) -> Vec<Sample> {
    let Ok(ops) = operations(events) else { return Vec::new() };
    ops.iter()
        .filter(|op| op.process < FINAL_PROCESS)
        .filter_map(|op| {
            let ret = op.ret?;
            let (call_ns, ret_ns) = (events[op.call].time_ns?, events[ret].time_ns?);
            Some(Sample { at_s: ret_ns as f64 / 1e9, latency_ms: (ret_ns.saturating_sub(call_ns) as f64 / 1e6).max(0.01), outcome: op.outcome.clone() })
        })
        .collect()
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Fail(_) => "fail",
        Outcome::Unknown => "info",
    }
}

fn outcome_color(name: &str) -> RGBColor {
    match name {
        "ok" => RGBColor(31, 119, 180),
        "fail" => RGBColor(255, 127, 14),
        _ => RGBColor(214, 39, 40),
    }
}

fn fault_color(kind: &str) -> RGBColor {
    match kind {
        "kill" => RGBColor(214, 39, 40),
        "pause" => RGBColor(148, 103, 189),
        "partition" => RGBColor(44, 160, 44),
        "clock" => RGBColor(188, 189, 34),
        "disk" => RGBColor(140, 86, 75),
        "packet" => RGBColor(23, 190, 207),
        "wipe" => RGBColor(227, 119, 194),
        "roster" => RGBColor(255, 127, 14),
        "app-kill" => RGBColor(31, 119, 180),
        "fs-kill" => RGBColor(64, 64, 64),
        "host-pause" => RGBColor(107, 174, 214),
        "machine-cut" => RGBColor(152, 223, 138),
        _ => RGBColor(127, 127, 127),
    }
}

pub(crate) fn kind_of(fault: &FaultRecord) -> String {
    serde_json::to_value(fault.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn plot_error(err: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing a plot: {err:?}")
}

/// Shades each fault's period over the y range, one legend entry per kind of fault.
fn shade_faults<DB: DrawingBackend, Y: plotters::coord::ranged1d::Ranged<ValueType = f64>>(
    chart: &mut ChartContext<DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    faults: &[FaultRecord],
    y: (f64, f64),
) -> Result<()> {
    let mut labelled = std::collections::BTreeSet::new();
    for fault in faults {
        let kind = kind_of(fault);
        let color = fault_color(&kind);
        let (start, end) = (fault.start_ms as f64 / 1000.0, fault.end_ms.max(fault.start_ms) as f64 / 1000.0);
        let series = chart.draw_series(std::iter::once(Rectangle::new([(start, y.0), (end, y.1)], color.mix(0.18).filled()))).map_err(plot_error)?;
        if labelled.insert(kind.clone()) {
            series.label(kind).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.4).filled()));
        }
    }
    Ok(())
}

pub(crate) fn latency_plot(path: &Path, samples: &[Sample], faults: &[FaultRecord], x_max: f64) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let y_max = samples.iter().map(|s| s.latency_ms).fold(10.0, f64::max) * 1.5;
    let y_min = 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency of each operation (by completion time; fault periods shaded)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("seconds").y_desc("latency (ms)").draw().map_err(plot_error)?;
    shade_faults(&mut chart, faults, (y_min, y_max))?;
    for name in ["ok", "fail", "info"] {
        let chosen: Vec<&Sample> = samples.iter().filter(|s| outcome_name(&s.outcome) == name).collect();
        if chosen.is_empty() {
            continue;
        }
        let stride = chosen.len().div_ceil(POINTS_PER_OUTCOME_MAX);
        let color = outcome_color(name);
        chart
            .draw_series(chosen.iter().step_by(stride).map(|s| Circle::new((s.at_s, s.latency_ms), 1, color.filled())))
            .map_err(plot_error)?
            .label(if stride > 1 { format!("{name} (1 in {stride})") } else { name.to_owned() })
            .legend(move |(x, y)| Circle::new((x + 6, y), 3, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

pub(crate) fn throughput_plot(path: &Path, samples: &[Sample], faults: &[FaultRecord], x_max: f64) -> Result<()> {
    let seconds = x_max.ceil() as usize + 1;
    let mut per_second: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in samples {
        per_second.entry(outcome_name(&s.outcome)).or_insert_with(|| vec![0; seconds])[(s.at_s as usize).min(seconds - 1)] += 1;
    }
    let y_max = per_second.values().flatten().copied().max().unwrap_or(1) as f64 * 1.15;
    let root = SVGBackend::new(path, (1100, 320)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Operations completed per second", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("seconds").y_desc("ops/s").draw().map_err(plot_error)?;
    shade_faults(&mut chart, faults, (0.0, y_max))?;
    for (name, counts) in &per_second {
        let color = outcome_color(name);
        chart
            .draw_series(LineSeries::new(counts.iter().enumerate().map(|(s, &n)| (s as f64 + 0.5, n as f64)), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// (key, history line) of every anomaly the checkers reported, in the order they gave.
fn anomaly_anchors(result: &serde_json::Value, ops: &[crate::history::Operation]) -> Vec<(String, usize, String)> {
    let mut anchors = Vec::new();
    let checks = &result["checks"];
    for key in checks["linearizable"]["not_linearizable_or_unknown"].as_array().into_iter().flatten() {
        if let Some(op) = key["stuck_operation"].as_u64().and_then(|i| ops.get(i as usize)) {
            let name = key["key"].as_str().unwrap_or_default().to_owned();
            anchors.push((name, op.call + 1, "not linearizable: no order of the operations before it explains this one".to_owned()));
        }
    }
    let listed = [&checks["session"], &checks["counter"]["anomalies"], &checks["lock"]["anomalies"]];
    for anomaly in listed.into_iter().filter_map(|a| a.as_array()).flatten() {
        if let (Some(key), Some(line)) = (anomaly["key"].as_str(), anomaly["line"].as_u64()) {
            let what = anomaly.get("detail").and_then(|d| d.as_str()).map_or_else(|| anomaly.to_string(), str::to_owned);
            anchors.push((key.to_owned(), line as usize, what));
        }
    }
    anchors
}

/// Writes OUT/index.html, OUT/latency.svg and OUT/throughput.svg.
pub fn write(out: &Path, options: &RunOptions, result: &serde_json::Value, events: &[Event], faults: &[FaultRecord]) -> Result<()> {
    let samples = samples(events);
    let x_max = events.iter().filter_map(|e| e.time_ns).max().unwrap_or(1_000_000_000) as f64 / 1e9;
    latency_plot(&out.join("latency.svg"), &samples, faults, x_max)?;
    throughput_plot(&out.join("throughput.svg"), &samples, faults, x_max)?;

    let valid = &result["valid"];
    let (verdict, color) = match valid {
        serde_json::Value::Bool(true) => ("valid", "#2ca02c"),
        serde_json::Value::Bool(false) => ("ANOMALIES FOUND", "#d62728"),
        _ => ("unknown", "#ff7f0e"),
    };
    let mut html = String::new();
    let workload = format!("{:?}", options.workload).to_lowercase();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>chunkcheck {workload} seed {seed}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}td,th{{padding:2px 10px;text-align:left;vertical-align:top}}\
         pre{{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}}.bad{{background:#fdd}}</style></head><body>\
         <h1>chunkcheck {workload}: <span style=\"color:{color}\">{verdict}</span></h1>",
        seed = options.seed
    );
    let nemeses: Vec<String> = options.nemeses.iter().map(|k| format!("{k:?}").to_lowercase()).collect();
    let rows = [
        ("seed", options.seed.to_string()),
        ("nodes / replication factor / groups", format!("{} / {} / {}", options.nodes, options.replication_factor, options.groups)),
        ("time limit", format!("{} s", options.time_limit.as_secs())),
        ("clients / keys", format!("{} / {}", options.concurrency, options.keys)),
        ("read policy", options.read_policy.name().to_owned()),
        ("nemesis", format!("{} every {} s", if nemeses.is_empty() { "none".into() } else { nemeses.join(", ") }, options.nemesis_interval.as_secs())),
        ("chunkd options", if options.chunkd_options.is_empty() { "none".into() } else { options.chunkd_options.join("; ") }),
        ("operations", format!("{} ({} ok, {} fail, {} info)", result["ops"], result["ok"], result["fail"], result["info"])),
        ("anomalies", result["anomalies"].to_string()),
        ("faults", result["nemesis_events"].to_string()),
        ("recovery after healing", format!("{} ms", result["recovery_ms"])),
        ("roster settled after recovery", result.get("roster_settled_ms").map_or("no roster changes".into(), |ms| format!("{ms} ms"))),
        (
            "ok ops/s during / outside faults",
            format!("{} / {}", result["availability"]["ok_per_sec_during_faults"], result["availability"]["ok_per_sec_outside_faults"]),
        ),
    ];
    html += "<table>";
    for (name, value) in rows {
        let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(name), escape(&value));
    }
    if let Some(error) = result["error"].as_str() {
        let _ = write!(html, "<tr class=\"bad\"><th>error</th><td>{}</td></tr>", escape(error));
    }
    for exit in result["node_exits"].as_array().into_iter().flatten() {
        let _ = write!(html, "<tr class=\"bad\"><th>node</th><td>{}</td></tr>", escape(exit.as_str().unwrap_or_default()));
    }
    html += "</table>";
    let _ = write!(
        html,
        "<p>Files: <a href=\"history.edn\">history.edn</a> (Jepsen EDN), <a href=\"results.json\">results.json</a>, \
         <a href=\"nemesis.log\">nemesis.log</a>, node logs in <a href=\"cluster/\">cluster/nodeN/chunkd.log</a>.</p>\
         <img src=\"latency.svg\" alt=\"latency over time\"><br><img src=\"throughput.svg\" alt=\"throughput over time\">"
    );

    html += "<h2>Faults</h2><table><tr><th>start (s)</th><th>end (s)</th><th>fault</th><th>nodes</th><th>detail</th></tr>";
    for fault in faults {
        let mut detail = String::new();
        if !fault.cuts.is_empty() {
            let cuts: Vec<String> = fault.cuts.iter().map(|(a, b)| format!("{a}→{b}")).collect();
            let _ = write!(detail, "cut {} (dropped {} packets)", cuts.join(" "), fault.dropped_packets.map_or("?".into(), |d| d.to_string()));
        }
        if !fault.clock_offsets.is_empty() {
            let offsets: Vec<String> = fault.clock_offsets.iter().map(|(n, ms)| format!("node {n} {ms:+} ms")).collect();
            let _ = write!(detail, "clocks: {}", offsets.join(", "));
        }
        let _ = write!(
            html,
            "<tr><td>{:.1}</td><td>{:.1}</td><td>{} {}</td><td>{:?}</td><td>{}</td></tr>",
            fault.start_ms as f64 / 1000.0,
            fault.end_ms as f64 / 1000.0,
            kind_of(fault),
            escape(&serde_json::to_value(fault.target).map(|v| v.as_str().unwrap_or_default().to_owned()).unwrap_or_default()),
            fault.nodes,
            escape(&detail)
        );
    }
    html += "</table>";

    let ops = operations(events).unwrap_or_default();
    let anchors = anomaly_anchors(result, &ops);
    if !anchors.is_empty() {
        let _ = write!(html, "<h2>Anomalies ({})</h2>", anchors.len());
        let shown = &anchors[..anchors.len().min(ANOMALIES_SHOWN_MAX)];
        // One pass over the history: the events of each key an anomaly concerns.
        let wanted: std::collections::HashSet<&str> = shown.iter().map(|(key, _, _)| key.as_str()).collect();
        let mut by_key: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
        for (i, event) in events.iter().enumerate() {
            if let Some(key) = event.key.as_ref().map(|k| k.to_string()).filter(|k| wanted.contains(k.as_str())) {
                by_key.entry(key).or_default().push(i);
            }
        }
        for (key, line, what) in shown {
            let _ = write!(html, "<h3>key {} at history line {line}</h3><p>{}</p><pre>", escape(key), escape(what));
            // The key's events up to the anomaly's line (and a few after), as history.edn has them.
            let same_key = by_key.get(key).map_or(&[][..], Vec::as_slice);
            let at = same_key.partition_point(|&i| i + 1 < *line);
            for &i in &same_key[at.saturating_sub(CONTEXT_EVENTS)..(at + 4).min(same_key.len())] {
                let mark = if i + 1 == *line { "▶" } else { " " };
                let _ = writeln!(html, "{mark} {:>7}  {}", i + 1, escape(&events[i].to_string()));
            }
            html += "</pre>";
        }
    }
    let _ = write!(html, "<h2>Checker output</h2><pre>{}</pre>", escape(&serde_json::to_string_pretty(&result["checks"]).unwrap_or_default()));
    let faults_of_kind = |kind: EventType| events.iter().filter(|e| e.process.is_none() && e.kind == kind).count();
    let _ = writeln!(html, "<p>{} nemesis events in the history.</p></body></html>", faults_of_kind(EventType::Info));
    std::fs::write(out.join("index.html"), html).map_err(|e| anyhow!("writing index.html: {e}"))
}
