//! The one SVG line chart behind `linattn demo` and `linattn train`: axes,
//! lines and a legend, drawn with plotters.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

/// One line: its points (x, y), colour and legend label.
pub(crate) struct Line {
    pub points: Vec<(f64, f64)>,
    pub colour: RGBColor,
    pub label: String,
}

/// What the axes show.
pub(crate) struct Axes<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x: std::ops::Range<f64>,
    pub y: std::ops::Range<f64>,
    /// Decimals of the y tick labels.
    pub y_decimals: usize,
    /// Where the legend goes (the corner the lines leave free).
    pub legend: SeriesLabelPosition,
}

/// Writes `lines` on `axes` as a 960 x 560 SVG at `path`.
pub(crate) fn write_svg(path: &Path, axes: Axes, lines: Vec<Line>) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(axes.title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(axes.x, axes.y)
        .map_err(e)?;
    let decimals = axes.y_decimals;
    chart
        .configure_mesh()
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(e)?;
    for line in lines {
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(line.points, colour.stroke_width(3)))
            .map_err(e)?
            .label(line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(axes.legend)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
