//! Line figures for the application runs (SVG, plotters).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One line of a figure: its name and its (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// A panel: title, x label, y label and its series.
pub struct Panel<'a> {
    /// Caption.
    pub title: &'a str,
    /// X axis label.
    pub x: &'a str,
    /// Y axis label.
    pub y: &'a str,
    /// The lines.
    pub series: Vec<Series>,
}

/// Draws panels side by side (each 600x450) into an SVG file.
pub fn lines(panels: &[Panel<'_>], out: &Path) -> anyhow::Result<()> {
    let n = u32::try_from(panels.len().max(1)).unwrap_or(1);
    let root = SVGBackend::new(out, (600 * n, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (p, area) in panels.iter().zip(areas) {
        let pts = p.series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(&area)
            .caption(p.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc(p.x)
            .y_desc(p.y)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (name, data)) in p.series.iter().enumerate() {
            let data: Vec<(f64, f64)> = data
                .iter()
                .copied()
                .filter(|q| q.0.is_finite() && q.1.is_finite())
                .collect();
            draw_line(&mut chart, i, name, data)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The charts drawn here: SVG, f64 on both axes.
pub type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the `i`-th series of a chart as a line with point markers, with its legend entry.
pub fn draw_line(
    chart: &mut Chart<'_, '_>,
    i: usize,
    name: &str,
    data: Vec<(f64, f64)>,
) -> anyhow::Result<()> {
    let color = Palette99::pick(i).to_rgba();
    draw_plain(chart, name, color, data.clone())?;
    chart
        .draw_series(data.into_iter().map(|q| Circle::new(q, 3, color.filled())))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Draws a line in `color` without markers, with its legend entry.
pub fn draw_plain(
    chart: &mut Chart<'_, '_>,
    name: &str,
    color: RGBAColor,
    data: Vec<(f64, f64)>,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(data, color.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    Ok(())
}

/// Draws a thin grey reference line (a limit, an ideal) with its legend entry.
pub fn draw_reference(
    chart: &mut Chart<'_, '_>,
    label: &str,
    points: Vec<(f64, f64)>,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(points, BLACK.mix(0.4).stroke_width(1)))
        .map_err(|e| anyhow!("{e}"))?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.4)));
    Ok(())
}

/// Draws the legend box at `position`.
/// (The backend outlives the chart, as plotters' legend drawing requires.)
pub fn draw_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}
