//! The training-curve figure: a grid of panels (e.g. knowledge accuracy, anchor drift, token KL,
//! preference accuracy against steps), written as SVG and PNG. Text uses the bundled DejaVu Sans
//! (no system fonts needed). Files are written to a temp name, then renamed.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// One line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Per point, a vertical interval `(low, high)` drawn as an error bar; empty = none.
    pub y_err: Vec<(f64, f64)>,
}

impl Series {
    /// A line without error bars.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            y_err: Vec::new(),
        }
    }
}

/// One panel: a titled chart with labelled axes and a legend.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed y range (e.g. `(0, 1)` for accuracies); `None` fits the data.
    pub y_range: Option<(f64, f64)>,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type PlotResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    panels: &[Panel],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let area = area
        .titled(title, ("sans-serif", 26))
        .map_err(|e| e.to_string())?;
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let cells = area.split_evenly((rows, cols));
    for (panel, cell) in panels.iter().zip(cells) {
        let pts = panel.series.iter().flat_map(|s| {
            let bars = s.points.iter().zip(&s.y_err);
            let ends = bars.flat_map(|(&(x, _), &(lo, hi))| [(x, lo), (x, hi)]);
            s.points.iter().copied().chain(ends)
        });
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(1e-3);
        let (y0, y1) = panel.y_range.unwrap_or((y0 - pad, y1 + pad));
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        // Error bars at the first and last x would sit on the frame: leave them a margin.
        let (x0, x1) = if panel.series.iter().any(|s| !s.y_err.is_empty()) {
            let m = (x1 - x0) * 0.04;
            (x0 - m, x1 + m)
        } else {
            (x0, x1)
        };
        let mut chart = ChartBuilder::on(&cell)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(&panel.x_label)
            .y_desc(&panel.y_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in panel.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(&s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
            let bars = s.points.iter().zip(&s.y_err);
            let finite = |&(&(x, y), &(lo, hi)): &(&(f64, f64), &(f64, f64))| {
                [x, y, lo, hi].iter().all(|v| v.is_finite())
            };
            chart
                .draw_series(bars.filter(finite).map(|(&(x, _), &(lo, hi))| {
                    PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(1))
                }))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    area.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes the panels as `<stem>.svg` and `<stem>.png` next to each other.
pub fn write_figure(stem: &Path, title: &str, panels: &[Panel]) -> PlotResult {
    register_font();
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1) as u32;
    let size = (560 * cols as u32, 60 + 380 * rows);
    let pid = std::process::id();
    let svg = stem.with_extension("svg");
    let svg_tmp = stem.with_extension(format!("tmp{pid}.svg"));
    draw(
        SVGBackend::new(&svg_tmp, size).into_drawing_area(),
        title,
        panels,
    )?;
    std::fs::rename(&svg_tmp, &svg)?;
    let png = stem.with_extension("png");
    let png_tmp = stem.with_extension(format!("tmp{pid}.png"));
    draw(
        BitMapBackend::new(&png_tmp, size).into_drawing_area(),
        title,
        panels,
    )?;
    std::fs::rename(&png_tmp, &png)?;
    Ok(())
}
