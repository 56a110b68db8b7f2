//! timeline.svg: attempts per second by outcome, the faults shaded —
//! drawn with `plotters`' SVG backend (no browser needed to read it).

use std::path::Path;

use plotters::prelude::*;

use super::Report;
use crate::workload::Outcome;

fn colour(o: Outcome) -> RGBColor {
    match o {
        Outcome::Ok => RGBColor(0x2c, 0xa0, 0x2c),
        Outcome::Client => RGBColor(0x94, 0x67, 0xbd),
        Outcome::Misdirected => RGBColor(0xff, 0x7f, 0x0e),
        Outcome::Server => RGBColor(0xd6, 0x27, 0x28),
        Outcome::Timeout => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

/// Draws the report's timeline into `path`.
pub fn draw(r: &Report, path: &Path) -> anyhow::Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let secs = r.per_second.len().max(1) as f64;
        let ymax = r
            .per_second
            .iter()
            .flat_map(|s| s.counts.values().copied())
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "cellchaos drill {} (seed {}): attempts per second by outcome",
                    r.scenario, r.seed
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..secs, 0f64..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the workload started")
            .y_desc("attempts / s")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Faults: from the step to its undo (or its end), shaded.
        for st in &r.steps {
            let from = st.event.at_ms as f64 / 1000.0;
            let to =
                (st.event.undone_ms.unwrap_or(st.event.done_ms) as f64 / 1000.0).max(from + 0.15);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(from, 0.0), (to, ymax)],
                    RGBColor(0xff, 0xd0, 0x60).mix(0.35).filled(),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    st.event.action.clone(),
                    (from, ymax * 0.97),
                    ("sans-serif", 11).into_font(),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for o in Outcome::ALL {
            let c = colour(o);
            chart
                .draw_series(LineSeries::new(
                    r.per_second.iter().map(|s| {
                        (
                            s.second as f64 + 0.5,
                            s.counts.get(o.as_str()).copied().unwrap_or(0) as f64,
                        )
                    }),
                    c.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(o.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::write(path, svg)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
