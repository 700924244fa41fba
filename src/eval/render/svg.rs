//! Inline SVG charts for the HTML report, drawn here rather than by a JavaScript library so the
//! report opens offline, from a file, with nothing fetched. Every text that reaches the SVG goes
//! through [`escape`].

use super::escape;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;

/// Colours of series, in order: Paul Tol's bright scheme, distinguishable with colour blindness.
const PALETTE: [&str; 7] = [
    "#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb",
];

/// Most points a line is drawn with; longer training logs are thinned evenly, keeping the last.
const MAX_LINE_POINTS: usize = 2000;

pub(super) fn color(series: usize) -> &'static str {
    PALETTE[series % PALETTE.len()]
}

/// A named line of `(x, y)` points.
pub(super) struct Series {
    pub(super) name: String,
    pub(super) points: Vec<(f64, f64)>,
    /// Drawn dashed: a reference level rather than a measurement.
    pub(super) dashed: bool,
}

/// How the x axis is spaced.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum XScale {
    Linear,
    /// Powers of two evenly apart, ticks at the data's own x values (embedding dimensions).
    Log2,
}

pub(super) struct LineChart<'a> {
    pub(super) title: &'a str,
    pub(super) x_label: &'a str,
    pub(super) y_label: &'a str,
    pub(super) x_scale: XScale,
    pub(super) series: Vec<Series>,
}

/// One bar with its interval whisker.
pub(super) struct Bar {
    pub(super) series: usize,
    pub(super) value: f64,
    pub(super) low: f64,
    pub(super) high: f64,
}

/// Bars side by side under one label (one metric).
pub(super) struct BarGroup {
    pub(super) label: String,
    pub(super) bars: Vec<Bar>,
}

pub(super) struct BarChart<'a> {
    pub(super) title: &'a str,
    pub(super) y_label: &'a str,
    pub(super) series_names: Vec<String>,
    pub(super) groups: Vec<BarGroup>,
}

/// Maps data to the plot area.
struct Frame {
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
    x_log2: bool,
}

impl Frame {
    fn x(&self, value: f64) -> f64 {
        let (value, min, max) = if self.x_log2 {
            (value.log2(), self.x_min.log2(), self.x_max.log2())
        } else {
            (value, self.x_min, self.x_max)
        };
        let span = if max > min { max - min } else { 1.0 };
        LEFT + (value - min) / span * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, value: f64) -> f64 {
        let span = if self.y_max > self.y_min {
            self.y_max - self.y_min
        } else {
            1.0
        };
        HEIGHT - BOTTOM - (value - self.y_min) / span * (HEIGHT - TOP - BOTTOM)
    }
}

pub(super) fn line_chart(chart: &LineChart<'_>) -> String {
    let points = || chart.series.iter().flat_map(|series| series.points.iter());
    let (x_min, x_max) = bounds(points().map(|p| p.0));
    let (y_min, y_max) = bounds(points().map(|p| p.1));
    let y_ticks = nice_ticks(y_min, y_max);
    let frame = Frame {
        x_min,
        x_max,
        y_min: y_ticks.first().copied().unwrap_or(y_min).min(y_min),
        y_max: y_ticks.last().copied().unwrap_or(y_max).max(y_max),
        x_log2: chart.x_scale == XScale::Log2,
    };
    let x_ticks = match chart.x_scale {
        // Ticks inside the data only, so the line starts at the y axis (steps start at 1).
        XScale::Linear => nice_ticks(x_min, x_max)
            .into_iter()
            .filter(|tick| (x_min..=x_max).contains(tick))
            .collect(),
        XScale::Log2 => {
            let mut xs: Vec<f64> = points().map(|p| p.0).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            xs
        }
    };

    let mut svg = open(chart.title);
    axes(
        &mut svg,
        &frame,
        &x_ticks,
        &y_ticks,
        chart.x_label,
        chart.y_label,
    );
    for (index, series) in chart.series.iter().enumerate() {
        let stride = series.points.len().div_ceil(MAX_LINE_POINTS).max(1);
        let mut path = String::new();
        for (i, (x, y)) in series.points.iter().enumerate() {
            if i % stride == 0 || i + 1 == series.points.len() {
                path.push_str(&format!("{:.1},{:.1} ", frame.x(*x), frame.y(*y)));
            }
        }
        let dash = if series.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            color(index),
            path.trim_end()
        ));
        if series.points.len() <= 16 && !series.dashed {
            for (x, y) in &series.points {
                svg.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n",
                    frame.x(*x),
                    frame.y(*y),
                    color(index)
                ));
            }
        }
    }
    let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut svg, &names);
    svg.push_str("</svg>\n");
    svg
}

pub(super) fn bar_chart(chart: &BarChart<'_>) -> String {
    let tops = chart
        .groups
        .iter()
        .flat_map(|group| group.bars.iter().map(|bar| bar.high.max(bar.value)));
    let (_, top) = bounds(tops);
    let y_ticks = nice_ticks(0.0, top.max(0.0));
    let frame = Frame {
        x_min: 0.0,
        x_max: 1.0,
        y_min: 0.0,
        y_max: y_ticks.last().copied().unwrap_or(1.0).max(top),
        x_log2: false,
    };
    let mut svg = open(chart.title);
    axes(&mut svg, &frame, &[], &y_ticks, "", chart.y_label);
    let plot_width = WIDTH - LEFT - RIGHT;
    let group_width = plot_width / chart.groups.len().max(1) as f64;
    let slots = chart.series_names.len().max(1) as f64;
    let bar_width = group_width * 0.8 / slots;
    for (g, group) in chart.groups.iter().enumerate() {
        let group_left = LEFT + g as f64 * group_width + group_width * 0.1;
        for bar in &group.bars {
            let x = group_left + bar.series as f64 * bar_width;
            let (y, base) = (frame.y(bar.value), frame.y(0.0));
            svg.push_str(&format!("<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}</title></rect>\n",
                x,
                bar_width * 0.92,
                (base - y).max(0.0),
                color(bar.series),
                escape(&format!(
                    "{}: {:.4} ({:.4} to {:.4})",
                    chart.series_names.get(bar.series).map_or("", String::as_str),
                    bar.value,
                    bar.low,
                    bar.high
                ))
            ));
            let middle = x + bar_width * 0.46;
            let (low, high) = (frame.y(bar.low), frame.y(bar.high));
            svg.push_str(&format!("<path class=\"whisker\" d=\"M{middle:.1},{low:.1}V{high:.1}M{:.1},{low:.1}H{:.1}M{:.1},{high:.1}H{:.1}\"/>\n",
                middle - 4.0,
                middle + 4.0,
                middle - 4.0,
                middle + 4.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            LEFT + (g as f64 + 0.5) * group_width,
            HEIGHT - BOTTOM + 18.0,
            escape(&group.label)
        ));
    }
    let names: Vec<&str> = chart.series_names.iter().map(String::as_str).collect();
    legend(&mut svg, &names);
    svg.push_str("</svg>\n");
    svg
}

fn open(title: &str) -> String {
    let mut svg = format!(
        "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\" aria-label=\"{0}\">\n<text class=\"title\" x=\"{LEFT}\" y=\"18\">{0}</text>\n",
        escape(title)
    );
    svg.reserve(4096);
    svg
}

fn axes(svg: &mut String, frame: &Frame, x_ticks: &[f64], y_ticks: &[f64], x: &str, y: &str) {
    let (bottom, right) = (HEIGHT - BOTTOM, WIDTH - RIGHT);
    for tick in y_ticks {
        let at = frame.y(*tick);
        svg.push_str(&format!("<line class=\"grid\" x1=\"{LEFT}\" y1=\"{at:.1}\" x2=\"{right}\" y2=\"{at:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT - 6.0,
            at + 4.0,
            format_tick(*tick)
        ));
    }
    for tick in x_ticks {
        let at = frame.x(*tick);
        svg.push_str(&format!("<line class=\"axis\" x1=\"{at:.1}\" y1=\"{bottom}\" x2=\"{at:.1}\" y2=\"{:.1}\"/><text x=\"{at:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            bottom + 4.0,
            bottom + 17.0,
            format_tick(*tick)
        ));
    }
    svg.push_str(&format!("<path class=\"axis\" d=\"M{LEFT},{TOP}V{bottom}H{right}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n<text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>\n",
        (LEFT + right) / 2.0,
        HEIGHT - 6.0,
        escape(x),
        (TOP + bottom) / 2.0,
        (TOP + bottom) / 2.0,
        escape(y)
    ));
}

fn legend(svg: &mut String, names: &[&str]) {
    for (index, name) in names.iter().enumerate() {
        let y = TOP + 6.0 + index as f64 * 18.0;
        svg.push_str(&format!("<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            WIDTH - RIGHT + 14.0,
            y - 10.0,
            color(index),
            WIDTH - RIGHT + 32.0,
            y,
            escape(name)
        ));
    }
}

/// The least and greatest finite value; (0, 1) when there is none.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min, max) = values
        .filter(|value| value.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), value| {
            (lo.min(value), hi.max(value))
        });
    if min.is_finite() {
        (min, max)
    } else {
        (0.0, 1.0)
    }
}

/// About five round tick values (1, 2 or 5 times a power of ten apart) covering `min..=max`.
pub(super) fn nice_ticks(min: f64, max: f64) -> Vec<f64> {
    let (min, max) = if max > min {
        (min, max)
    } else {
        let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
        (min - pad, max + pad)
    };
    let rough = (max - min) / 5.0;
    let exponent = rough.log10().floor() as i32;
    let magnitude = 10f64.powi(exponent);
    let factor = [1, 2, 5, 10]
        .into_iter()
        .find(|factor| f64::from(*factor) * magnitude >= rough)
        .unwrap_or(10);
    let step = f64::from(factor) * magnitude;
    // i·factor is a whole number; scaling it by a power of ten in one correctly rounded
    // operation gives 0.6, where i·step would give 0.6000000000000001.
    let tick = |i: i64| {
        let whole = (i * i64::from(factor)) as f64;
        if exponent < 0 {
            whole / 10f64.powi(-exponent)
        } else {
            whole * magnitude
        }
    };
    let first = (min / step).floor() as i64;
    let last = (max / step).ceil() as i64;
    (first..=last).map(tick).collect()
}

/// Tick labels: integers plainly, small numbers (learning rates) in scientific notation.
fn format_tick(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value.abs() < 1e-3 {
        format!("{value:.1e}")
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 1.0), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let ticks = nice_ticks(0.37, 0.81);
        assert_eq!(ticks.first().copied(), Some(0.3));
        assert!(ticks.last().copied().is_some_and(|last| last >= 0.81));
        // A flat line still gets an axis.
        assert!(nice_ticks(2.0, 2.0).len() >= 2);
        assert_eq!(format_tick(2e-5), "2.0e-5");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(128.0), "128");
    }

    #[test]
    fn escapes_text_and_draws_every_series() {
        let chart = LineChart {
            title: "loss <by> step",
            x_label: "step",
            y_label: "loss",
            x_scale: XScale::Linear,
            series: vec![Series {
                name: "a & b".to_owned(),
                points: (0..5000)
                    .map(|i| (f64::from(i), 1.0 / f64::from(i + 1)))
                    .collect(),
                dashed: false,
            }],
        };
        let svg = line_chart(&chart);
        assert!(svg.contains("loss &lt;by&gt; step"));
        assert!(svg.contains("a &amp; b"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        // Thinned to at most MAX_LINE_POINTS (+ the last point).
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map_or(0, |list| list.split(' ').count());
        assert!(points <= MAX_LINE_POINTS + 1, "{points}");
    }
}
