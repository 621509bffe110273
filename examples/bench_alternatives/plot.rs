//! The figure: per contender and variant, request latency over time (one
//! round), restarts shaded, failures as red ticks. SVG through `plotters`
//! (a dev-dependency), with its built-in font metrics: no font files needed.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::measure::Run;

/// Width of one latency bin.
const BIN: Duration = Duration::from_millis(100);
const PANEL_W: u32 = 600;
const PANEL_H: u32 = 170;
const RESTART_FILL: RGBColor = RGBColor(255, 214, 153);
const MAX_LINE: RGBColor = RGBColor(31, 119, 180);
const MEDIAN_LINE: RGBColor = RGBColor(120, 120, 120);

/// Per bin of `BIN`: (bin start s, median ms, max ms) of OK requests by
/// the time they finished.
fn bins(run: &Run) -> Vec<(f64, f64, f64)> {
    let mut by_bin: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (lat, end) in run.ok_samples() {
        by_bin
            .entry((end.as_millis() / BIN.as_millis()) as u64)
            .or_default()
            .push(lat);
    }
    by_bin
        .into_iter()
        .map(|(b, mut v)| {
            v.sort_by(f64::total_cmp);
            let x = b as f64 * BIN.as_secs_f64();
            (x, v[v.len() / 2], v[v.len() - 1])
        })
        .collect()
}

/// Splits bins into runs of consecutive bins.
fn segments(bins: &[(f64, f64, f64)]) -> Vec<&[(f64, f64, f64)]> {
    let step = BIN.as_secs_f64() * 1.5;
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=bins.len() {
        if i == bins.len() || bins[i].0 - bins[i - 1].0 > step {
            if start < i {
                out.push(&bins[start..i]);
            }
            start = i;
        }
    }
    out
}

/// Writes one panel per run, `columns` per line, to `path`.
pub fn write_svg(path: &Path, runs: &[&Run], columns: usize, title: &str) -> Result<()> {
    let columns = columns.max(1);
    let lines = runs.len().div_ceil(columns).max(1);
    let header = 40;
    let size = (PANEL_W * columns as u32, PANEL_H * lines as u32 + header);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, body) = root.split_vertically(header);
    top.titled(title, ("sans-serif", 16))
        .map_err(|e| anyhow!("{e}"))?;
    // One y scale for every panel, so stalls compare across contenders.
    let y_max = runs
        .iter()
        .flat_map(|r| r.ok_samples().map(|(l, _)| l))
        .fold(100.0_f64, f64::max);
    let y_max = 10f64.powf(y_max.log10().ceil());
    let y_min = 5.0;
    let panels = body.split_evenly((lines, columns));
    for (run, area) in runs.iter().zip(panels.iter()) {
        panel(area, run, y_min, y_max).map_err(|e| anyhow!("{}: {e}", run.kind.id()))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    run: &Run,
    y_min: f64,
    y_max: f64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let x_max = run.report.elapsed.as_secs_f64().max(1.0);
    let failed = run.report.failed();
    let caption = format!(
        "{} ({}): {} ok, {} failed",
        run.kind.label(),
        run.variant.name(),
        run.report.ok,
        failed
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 13))
        .margin(6)
        .x_label_area_size(22)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(4)
        .y_desc("ms")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 10))
        .axis_desc_style(("sans-serif", 10))
        .light_line_style(WHITE)
        .draw()?;
    chart.draw_series(run.windows.iter().map(|(t, d)| {
        Rectangle::new(
            [
                (t.as_secs_f64(), y_min),
                (d.as_secs_f64().max(t.as_secs_f64() + 0.03), y_max),
            ],
            RESTART_FILL.mix(0.6).filled(),
        )
    }))?;
    // Lines break where a bin has no finished request (a stall), rather
    // than drawing a slope across it.
    for seg in segments(&bins(run)) {
        chart.draw_series(LineSeries::new(
            seg.iter().map(|(x, m, _)| (*x, m.max(y_min))),
            MEDIAN_LINE,
        ))?;
        chart.draw_series(LineSeries::new(
            seg.iter().map(|(x, _, mx)| (*x, mx.max(y_min))),
            MAX_LINE,
        ))?;
        if seg.len() == 1 {
            let (x, _, mx) = seg[0];
            chart.draw_series(std::iter::once(Circle::new(
                (x, mx.max(y_min)),
                2,
                MAX_LINE.filled(),
            )))?;
        }
    }
    // A red tick per 20 ms with failures (thousands of refusals would
    // otherwise be thousands of identical lines).
    let mut ticks: Vec<u64> = run
        .report
        .timeline
        .iter()
        .filter(|s| s.outcome.is_err())
        .map(|s| (s.ended.as_millis() / 20) as u64)
        .collect();
    ticks.dedup();
    chart.draw_series(ticks.iter().map(|t| {
        let x = *t as f64 * 0.02;
        PathElement::new(vec![(x, y_min), (x, y_min * 3.0)], RED.stroke_width(2))
    }))?;
    Ok(())
}
