//! `index.html` of a files run: the verdict, latency and throughput of the applications' calls
//! over time with the fault periods shaded (the cluster report's plots), the faults, and what
//! the check found in each file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};

use super::FilesOptions;
use crate::cluster_check::report::{escape, kind_of, latency_plot, samples, throughput_plot};
use crate::cluster_check::FaultRecord;
use crate::history::Event;
use plotters::prelude::*;

/// Writes OUT/index.html, OUT/latency.svg and OUT/throughput.svg.
pub fn write(out: &Path, options: &FilesOptions, result: &serde_json::Value, events: &[Event], faults: &[FaultRecord]) -> Result<()> {
    let samples = samples(events);
    let x_max = events.iter().filter_map(|e| e.time_ns).max().unwrap_or(1_000_000_000) as f64 / 1e9;
    latency_plot(&out.join("latency.svg"), &samples, faults, x_max)?;
    throughput_plot(&out.join("throughput.svg"), &samples, faults, x_max)?;
    let takeovers: Vec<(f64, f64)> =
        result["takeover_ms"].as_array().into_iter().flatten().filter_map(|t| Some((t["at_ms"].as_f64()? / 1000.0, t["took_ms"].as_f64()?))).collect();
    if !takeovers.is_empty() {
        takeover_plot(&out.join("takeover.svg"), &takeovers, x_max)?;
    }
    let (verdict, color) = match &result["valid"] {
        serde_json::Value::Bool(true) => ("valid", "#2ca02c"),
        serde_json::Value::Bool(false) => ("ACKNOWLEDGED WRITES LOST OR CORRUPT", "#d62728"),
        _ => ("unknown", "#ff7f0e"),
    };
    let workload = serde_json::to_value(options.workload)?.as_str().unwrap_or_default().to_owned();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>chunkcheck files {workload} seed {seed}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}td,th{{padding:2px 10px;text-align:left;vertical-align:top}}\
         pre{{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}}.bad{{background:#fdd}}</style></head><body>\
         <h1>chunkcheck files {workload}: <span style=\"color:{color}\">{verdict}</span></h1>",
        seed = options.seed
    );
    let nemeses: Vec<String> =
        options.nemeses.iter().map(|k| serde_json::to_value(k).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()).collect();
    let rows = [
        ("seed", options.seed.to_string()),
        ("via / writers", format!("{:?} / {}", options.via, options.writers).to_lowercase()),
        ("nodes / replication factor / groups", format!("{} / {} / {}", options.nodes, options.replication_factor, options.groups)),
        ("time limit", format!("{} s", options.time_limit.as_secs())),
        ("nemesis", format!("{} every {} s", if nemeses.is_empty() { "none".into() } else { nemeses.join(", ") }, options.nemesis_interval.as_secs())),
        ("chunkfs options", if options.chunkfs_options.is_empty() { "none".into() } else { options.chunkfs_options.join(" ") }),
        ("calls", format!("{} ({} acknowledged, {} unknown)", result["ops"], result["ok"], result["info"])),
        ("acknowledged records", result["acked"].to_string()),
        ("lost / corrupt", format!("{} / {}", result["lost"], result["corrupt"])),
        ("application starts", result["app_starts"].to_string()),
        ("faults", result["nemesis_events"].to_string()),
        ("recovery after every node restarted", format!("{} ms", result["recovery_ms"])),
    ];
    let mut rows = rows.to_vec();
    if result.get("takeovers").is_some() {
        rows.push(("dual writers", result["dual_writers"].to_string()));
        rows.push((
            "takeovers (p50 / max)",
            format!(
                "{} ({} ms / {} ms; lease {} ms; {} resumed on the same machine)",
                result["takeovers"], result["takeover_p50_ms"], result["takeover_max_ms"], result["lease_ms"], result["resumed_on_the_same_machine"]
            ),
        ));
    }
    html += "<table>";
    for (name, value) in rows {
        let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(name), escape(&value));
    }
    if let Some(error) = result["error"].as_str() {
        let _ = write!(html, "<tr class=\"bad\"><th>error</th><td>{}</td></tr>", escape(error));
    }
    for problem in result["problems"].as_array().into_iter().flatten() {
        let _ = write!(html, "<tr class=\"bad\"><th>problem</th><td>{}</td></tr>", escape(problem.as_str().unwrap_or_default()));
    }
    html += "</table>";
    html += "<p>Files: <a href=\"history.edn\">history.edn</a> (each call of each application process), \
             <a href=\"results.json\">results.json</a>, <a href=\"nemesis.log\">nemesis.log</a>, \
             <a href=\"writers.log\">writers.log</a>, <a href=\"chunkfs.log\">chunkfs.log</a>, \
             node logs in <a href=\"cluster/\">cluster/nodeN/chunkd.log</a>.</p>\
             <img src=\"latency.svg\" alt=\"latency over time\"><br><img src=\"throughput.svg\" alt=\"throughput over time\">";
    if !takeovers.is_empty() {
        html += "<br><img src=\"takeover.svg\" alt=\"takeover times\">";
    }

    html += "<h2>Files</h2><table><tr><th>file</th><th>sync</th><th>bytes</th><th>acknowledged</th><th>whole records</th><th>lost</th><th>corrupt</th></tr>";
    for file in result["files"].as_array().into_iter().flatten() {
        let bad = file["lost_count"].as_u64().unwrap_or(0) + file["corrupt_count"].as_u64().unwrap_or(0) > 0;
        let _ = write!(
            html,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if bad { " class=\"bad\"" } else { "" },
            escape(file["file"].as_str().unwrap_or_default()),
            escape(file["sync"].as_str().unwrap_or_default()),
            file["bytes"],
            file["acked"],
            file["records"],
            file["lost_count"],
            file["corrupt_count"]
        );
    }
    html += "</table>";
    for file in result["files"].as_array().into_iter().flatten() {
        let findings: Vec<String> = file["corrupt"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .chain(file["lost"].as_array().into_iter().flatten().map(|l| format!("lost: acknowledged record {} at {}", l["seq"], l["offset"])))
            .collect();
        if !findings.is_empty() {
            let _ = write!(html, "<h3>{}</h3><pre>{}</pre>", escape(file["file"].as_str().unwrap_or_default()), escape(&findings.join("\n")));
        }
    }

    if let Some(bank) = result.get("bank") {
        let _ = write!(
            html,
            "<h2>Database</h2><table><tr><th>committed transfers</th><td>{}</td></tr><tr><th>transfers in the database</th><td>{}</td></tr>\
             <tr><th>final total</th><td>{}</td></tr><tr><th>integrity checks</th><td>{}</td></tr><tr><th>lost / corrupt</th><td>{} / {}</td></tr></table>",
            bank["acked"], bank["transfers"], bank["total"], bank["integrity_checks"], bank["lost_count"], result["corrupt"]
        );
        let findings: Vec<String> = bank["corrupt"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .chain(bank["lost"].as_array().into_iter().flatten().filter_map(|l| l.as_str().map(|id| format!("lost: committed transfer {id}"))))
            .collect();
        if !findings.is_empty() {
            let _ = write!(html, "<pre>{}</pre>", escape(&findings.join("\n")));
        }
    }

    html += "<h2>Faults</h2><table><tr><th>start (s)</th><th>end (s)</th><th>fault</th><th>nodes or processes</th></tr>";
    for fault in faults {
        let _ = write!(
            html,
            "<tr><td>{:.1}</td><td>{:.1}</td><td>{} {}</td><td>{:?}</td></tr>",
            fault.start_ms as f64 / 1000.0,
            fault.end_ms as f64 / 1000.0,
            kind_of(fault),
            escape(&serde_json::to_value(fault.target).map(|v| v.as_str().unwrap_or_default().to_owned()).unwrap_or_default()),
            fault.nodes
        );
    }
    html += "</table></body></html>";
    std::fs::write(out.join("index.html"), html).map_err(|e| anyhow!("writing index.html: {e}"))
}

/// Failover: each takeover's time (from the fault to the standby's first acknowledged record),
/// at the moment of its fault, against the 5 s goal.
fn takeover_plot(path: &Path, takeovers: &[(f64, f64)], x_max: f64) -> Result<()> {
    let plot_error = |err: &dyn std::fmt::Debug| anyhow!("drawing the takeover plot: {err:?}");
    let root = SVGBackend::new(path, (1100, 320)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let y_max = takeovers.iter().map(|&(_, ms)| ms).fold(GOAL_MS, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("Takeover: from the fault to the standby's first acknowledged record", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| plot_error(&e))?;
    chart.configure_mesh().x_desc("seconds (the fault's start)").y_desc("takeover (ms)").draw().map_err(|e| plot_error(&e))?;
    let color = RGBColor(31, 119, 180);
    chart
        .draw_series(takeovers.iter().map(|&(at, ms)| Rectangle::new([(at - 0.4, 0.0), (at + 0.4, ms)], color.filled())))
        .map_err(|e| plot_error(&e))?
        .label("takeover")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    let red = RGBColor(214, 39, 40);
    chart
        .draw_series(std::iter::once(PathElement::new(vec![(0.0, GOAL_MS), (x_max, GOAL_MS)], red.stroke_width(1))))
        .map_err(|e| plot_error(&e))?
        .label("goal: 5 s")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], red.stroke_width(1)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))
}

/// The takeover goal.
const GOAL_MS: f64 = 5000.0;
