//! The timeline plot: an SVG line chart written by hand (no plotting library, no system
//! fonts or libraries needed).
//!
//! Left axis, items/s: the offered rate, the achieved rate (results) and errors per
//! second. Right axis, milliseconds: the p99 latency of each second's results. A dashed
//! vertical line marks the end of the schedule; what follows it is the drain. Below, on
//! the same time axis, a strip shows how many workers answered each second, which is how
//! an autoscaled pool's size is seen following the load.

use std::fmt::Write as _;

use crate::report::{fmt_rate, Report};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 610.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 80.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 165.0;
/// The workers strip: its distance below the main plot and its height.
const STRIP_GAP: f64 = 38.0;
const STRIP_H: f64 = 64.0;
const WORKERS: &str = "#9467bd";

const P99: &str = "#ff7f0e";

/// How one series is drawn and named in the legend.
struct Style {
    label: &'static str,
    color: &'static str,
    width: f64,
    opacity: f64,
    dash: Option<&'static str>,
}

impl Style {
    fn attributes(&self) -> String {
        let mut a = format!(r#" stroke="{}" stroke-width="{}""#, self.color, self.width);
        if self.opacity < 1.0 {
            a.push_str(&format!(r#" stroke-opacity="{}""#, self.opacity));
        }
        if let Some(dash) = self.dash {
            a.push_str(&format!(r#" stroke-dasharray="{dash}""#));
        }
        a
    }
}

const OFFERED_STYLE: Style = Style {
    label: "offered rate (items/s)",
    color: "#1f77b4",
    width: 5.0,
    opacity: 0.45,
    dash: None,
};
const ACHIEVED_STYLE: Style = Style {
    label: "achieved rate (results/s)",
    color: "#2ca02c",
    width: 1.8,
    opacity: 1.0,
    dash: None,
};
const ERRORS_STYLE: Style = Style {
    label: "errors/s",
    color: "#d62728",
    width: 1.8,
    opacity: 1.0,
    dash: None,
};
const P99_STYLE: Style = Style {
    label: "p99 latency (ms, right axis)",
    color: P99,
    width: 1.8,
    opacity: 1.0,
    dash: Some("6 3"),
};

/// A point on the canvas.
type Point = (f64, f64);

/// The plot of a report's timeline as an SVG document.
pub fn timeline_svg(report: &Report) -> String {
    let rows = &report.timeline;
    let span = (rows.len() as f64).max(1.0);
    let rate_max = rows
        .iter()
        .flat_map(|r| [r.offered as f64, r.ok as f64, r.errors as f64])
        .fold(0.0, f64::max);
    let p99_max = rows.iter().filter_map(|r| r.p99_ms).fold(0.0, f64::max);
    let (rate_step, rate_top) = nice_ticks(rate_max, 6);
    let (ms_step, ms_top) = nice_ticks(p99_max, 6);
    let (t_step, _) = nice_ticks(span, 10);

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + plot_w * t / span;
    let y_rate = |v: f64| TOP + plot_h * (1.0 - v / rate_top);
    let y_ms = |v: f64| TOP + plot_h * (1.0 - v / ms_top);

    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored throughout.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let info = &report.info;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(&format!(
            "tidepool-load → {}: {} profile, peak {}/s",
            info.target,
            info.profile.name(),
            fmt_rate(info.profile.peak())
        ))
    );

    // Horizontal grid and the left axis labels.
    let mut v = 0.0;
    while v <= rate_top + rate_step / 2.0 {
        let yy = y_rate(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/>"##,
            WIDTH - RIGHT
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            yy + 4.0,
            tick_label(v, rate_step)
        );
        v += rate_step;
    }
    // The right axis labels.
    let mut v = 0.0;
    while v <= ms_top + ms_step / 2.0 {
        let yy = y_ms(v);
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{P99}"/>"##,
            WIDTH - RIGHT,
            WIDTH - RIGHT + 5.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="{P99}">{}</text>"##,
            WIDTH - RIGHT + 8.0,
            yy + 4.0,
            tick_label(v, ms_step)
        );
        v += ms_step;
    }
    // The time axis.
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let xx = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333"/>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            HEIGHT - BOTTOM + 20.0,
            tick_label(t, t_step)
        );
        t += t_step;
    }
    // The frame.
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    // Axis titles.
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since start (s)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">items per second</text>"#,
        TOP + plot_h / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({:.1} {:.1}) rotate(90)" text-anchor="middle" fill="{P99}">p99 latency (ms)</text>"##,
        WIDTH - 18.0,
        TOP + plot_h / 2.0
    );
    // The end of the schedule, when the run went past it.
    if info.duration_s > 0.0 && info.duration_s < span {
        let xx = x(info.duration_s);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 4"/>"##,
            HEIGHT - BOTTOM
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#888" font-size="11" text-anchor="end">end of schedule</text>"##,
            xx - 4.0,
            TOP + 14.0
        );
    }

    // The series, each point in the middle of its second. The offered rate is drawn wide
    // and pale under the others, so it stays visible where the achieved rate covers it.
    let mid = |i: usize| x(i as f64 + 0.5);
    let series: [(Style, Vec<Option<Point>>); 4] = [
        (
            OFFERED_STYLE,
            (0..rows.len())
                .map(|i| Some((mid(i), y_rate(rows[i].offered as f64))))
                .collect(),
        ),
        (
            ACHIEVED_STYLE,
            (0..rows.len())
                .map(|i| Some((mid(i), y_rate(rows[i].ok as f64))))
                .collect(),
        ),
        (
            ERRORS_STYLE,
            (0..rows.len())
                .map(|i| Some((mid(i), y_rate(rows[i].errors as f64))))
                .collect(),
        ),
        (
            P99_STYLE,
            (0..rows.len())
                .map(|i| rows[i].p99_ms.map(|v| (mid(i), y_ms(v))))
                .collect(),
        ),
    ];
    for (style, points) in &series {
        // A second without a value breaks the line.
        for run in points.split(Option::is_none) {
            let run: Vec<Point> = run.iter().flatten().copied().collect();
            match run.as_slice() {
                [] => {}
                [(px, py)] => {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{px:.1}" cy="{py:.1}" r="2.5" fill="{}"/>"#,
                        style.color
                    );
                }
                _ => {
                    let coords: Vec<String> = run
                        .iter()
                        .map(|(px, py)| format!("{px:.1},{py:.1}"))
                        .collect();
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke-linejoin="round"{}/>"#,
                        coords.join(" "),
                        style.attributes()
                    );
                }
            }
        }
    }

    workers_strip(&mut s, rows, &x, plot_w);

    // The legend, above the plot.
    let mut lx = LEFT;
    for (style, _) in &series {
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="48" x2="{:.1}" y2="48"{}/>"#,
            lx + 26.0,
            style.attributes()
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="52">{}</text>"#,
            lx + 32.0,
            style.label
        );
        lx += 40.0 + 7.0 * style.label.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

/// The strip under the main plot: workers that answered in each second, as steps.
fn workers_strip(
    s: &mut String,
    rows: &[crate::report::SecondRow],
    x: &dyn Fn(f64) -> f64,
    plot_w: f64,
) {
    let most = rows.iter().map(|r| r.active_workers).max().unwrap_or(0);
    if most == 0 {
        return;
    }
    let top = HEIGHT - BOTTOM + STRIP_GAP;
    let y = |n: usize| top + STRIP_H * (1.0 - n as f64 / most as f64);
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top:.1}" width="{plot_w}" height="{STRIP_H}" fill="none" stroke="#333"/>"##
    );
    for n in [0, most] {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{WORKERS}">{n}</text>"##,
            LEFT - 8.0,
            y(n) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" fill="{WORKERS}">workers answering</text>"##,
        LEFT + 6.0,
        top + 14.0
    );
    let mut points = Vec::with_capacity(rows.len() * 2);
    for (i, row) in rows.iter().enumerate() {
        let yy = y(row.active_workers);
        points.push(format!("{:.1},{yy:.1}", x(i as f64)));
        points.push(format!("{:.1},{yy:.1}", x(i as f64 + 1.0)));
    }
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="{WORKERS}" stroke-width="2"/>"##,
        points.join(" ")
    );
}

/// A tick step of 1, 2 or 5 times a power of ten giving about `target` ticks up to
/// `max`, and the axis top: the first multiple of the step at or above `max`.
pub(crate) fn nice_ticks(max: f64, target: u32) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / f64::from(target.max(1));
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude);
    let top = (max / step - 1e-9).ceil().max(1.0) * step;
    (step, top)
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{RunInfo, SecondRow};
    use std::collections::BTreeMap;

    #[test]
    fn nice_ticks_cover_the_max_with_round_steps() {
        assert_eq!(nice_ticks(0.0, 5), (0.2, 1.0));
        assert_eq!(nice_ticks(100.0, 5), (20.0, 100.0));
        assert_eq!(nice_ticks(101.0, 5), (50.0, 150.0));
        assert_eq!(nice_ticks(7.3, 6), (2.0, 8.0));
        assert_eq!(nice_ticks(0.034, 6), (0.01, 0.04));
        let (step, top) = nice_ticks(1234.0, 6);
        assert_eq!((step, top), (500.0, 1500.0));
    }

    #[test]
    fn tick_labels_have_the_decimals_they_need() {
        assert_eq!(tick_label(40.0, 20.0), "40");
        assert_eq!(tick_label(0.2, 0.2), "0.2");
        assert_eq!(tick_label(0.05, 0.01), "0.05");
    }

    #[test]
    fn plot_has_every_series_and_breaks_on_gaps() {
        let row = |t: u64, p99: Option<f64>| SecondRow {
            t,
            profile_rate: 10.0,
            offered: 10,
            skipped: 0,
            ok: 9,
            errors: 1,
            errors_by: BTreeMap::new(),
            p50_ms: p99,
            p99_ms: p99,
            active_workers: 1,
        };
        let report = crate::report::Report {
            info: RunInfo {
                target: "a<b".into(),
                duration_s: 3.0,
                ..RunInfo::default()
            },
            offered: 0,
            sent: 0,
            skipped: 0,
            answered: 0,
            outcomes: BTreeMap::new(),
            window_s: 0.0,
            throughput: 0.0,
            latency_ms: Default::default(),
            goodput: None,
            batch_sizes: BTreeMap::new(),
            batch_size_mean: None,
            workers: Vec::new(),
            error_examples: BTreeMap::new(),
            timeline: vec![
                row(0, Some(1.0)),
                row(1, Some(2.0)),
                row(2, None),
                row(3, Some(3.0)),
            ],
        };
        let svg = timeline_svg(&report);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a&lt;b"));
        // Offered, achieved, errors: one line each; p99: one line and one lone point;
        // the workers strip: one step line.
        assert_eq!(svg.matches("<polyline").count(), 5);
        assert!(svg.contains("workers answering"));
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("end of schedule"));
    }
}
