//! SVG figures (plotters).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::cmd::overlay::Row;

fn series_name(r: &Row) -> String {
    match r.system.as_str() {
        "raw" => "raw underlay".into(),
        "mvc" => format!("mvc {} {} ({})", r.cipher, r.path, r.datapath),
        s => format!("{s} {}", r.path),
    }
}

/// Throughput (left) and ping RTT (right) against the added one-way delay, one line per
/// configuration.
pub fn overlay_vs_delay(rows: &[Row], out: &Path) -> anyhow::Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for r in rows {
        series.entry(series_name(r)).or_default().push((
            f64::from(r.delay_ms),
            r.gbps * 1000.0,
            r.rtt_ms.unwrap_or(f64::NAN),
        ));
    }
    let max_d = rows
        .iter()
        .map(|r| f64::from(r.delay_ms))
        .fold(1.0, f64::max);
    let max_t = rows.iter().map(|r| r.gbps * 1000.0).fold(1.0, f64::max) * 1.1;
    let max_r = rows.iter().filter_map(|r| r.rtt_ms).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(600);
    let panels = [
        (left, "TCP throughput VM -> VM (Mb/s)", max_t, true),
        (right, "ping RTT VM -> VM (ms)", max_r, false),
    ];
    for (area, title, ymax, tput) in panels {
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_d, 0.0..ymax)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("added one-way delay on site B's uplink (ms)")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let data: Vec<(f64, f64)> = pts
                .iter()
                .map(|&(d, t, r)| (d, if tput { t } else { r }))
                .filter(|p| p.1.is_finite())
                .collect();
            crate::cmd::figure::draw_line(&mut chart, i, name, data)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(if tput {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
