//! `strata-bench-chart RESULTS.json OUT_DIR`: one SVG per filesystem of a
//! bench/run results file (`OUT_DIR/benchmarks-<fs>.svg`), a horizontal bar
//! per target and workload showing its ratio to native on a log scale.
//!
//! The ratios are the ones bench.py computed (`summary[fs][workload][target]
//! .ratio`, >1 always meaning slower than native), so the chart never
//! disagrees with the markdown tables. Workloads without ratios (rss) are left
//! out. Any bad input is one line on stderr and exit status 2: bench.py only
//! warns then and keeps its tables.

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// One bar: a target's median as a ratio to native's.
struct Bar {
    target: String,
    ratio: f64,
}

/// The bars of one workload, in target order.
struct Group {
    workload: String,
    bars: Vec<Bar>,
}

/// Everything one SVG shows.
struct FsChart {
    fs: String,
    subtitle: String,
    targets: Vec<String>,
    groups: Vec<Group>,
}

// Layout in pixels. Every bar gets the same thickness and the canvas grows
// with the number of bars, so labels never have to shrink to fit.
const WIDTH: u32 = 1000;
const BAR_PX: u32 = 20;
const GROUP_GAP: f64 = 0.8; // between groups, in bar heights
const HEADER_PX: u32 = 60; // title and subtitle
const LEGEND_ROW_PX: u32 = 22;
const AXIS_PX: u32 = 55; // x tick labels and axis description
/// Room left beyond the extreme bars for their labels ("55.2x"), as a factor
/// on the log axis; the axis is then widened to whole decades.
const LABEL_ROOM: f64 = 1.6;
const FONT: &str = "sans-serif";

/// Fixed colours for the targets bench/run knows, so a target looks the same
/// in every chart of every run (Tableau 10, related targets in related hues).
const COLOURS: &[(&str, RGBColor)] = &[
    ("strata", RGBColor(31, 119, 180)),
    ("strata-devfuse", RGBColor(174, 199, 232)),
    ("strata-overlay", RGBColor(23, 190, 207)),
    ("strata-image", RGBColor(44, 160, 44)),
    ("strata-image-ro", RGBColor(152, 223, 138)),
    ("strata-union3", RGBColor(148, 103, 189)),
    ("mergerfs", RGBColor(255, 127, 14)),
    ("mergerfs-union3", RGBColor(255, 187, 120)),
    ("bindfs", RGBColor(214, 39, 40)),
    ("fuse-overlayfs", RGBColor(140, 86, 75)),
];
const OTHER_COLOURS: &[RGBColor] = &[
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

fn colour(target: &str) -> RGBColor {
    COLOURS.iter().find(|(t, _)| *t == target).map_or_else(
        // A target added later still gets a stable colour: one picked by its name.
        || OTHER_COLOURS[target.bytes().map(usize::from).sum::<usize>() % OTHER_COLOURS.len()],
        |(_, c)| *c,
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: strata-bench-chart RESULTS.json OUT_DIR");
        return ExitCode::from(2);
    }
    match run(Path::new(&args[1]), Path::new(&args[2])) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata-bench-chart: {e}");
            ExitCode::from(2)
        }
    }
}

/// Reads RESULTS and writes one SVG per filesystem into OUT_DIR; returns their paths.
fn run(results: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let text =
        std::fs::read_to_string(results).map_err(|e| format!("{}: {e}", results.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: bad JSON: {e}", results.display()))?;
    let charts = charts(&json).map_err(|e| format!("{}: {e}", results.display()))?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut paths = Vec::new();
    for chart in &charts {
        // Drawn in memory and written whole: an error leaves no half an SVG behind.
        let path = out_dir.join(format!("benchmarks-{}.svg", file_safe(&chart.fs)));
        let svg = render(chart).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(&path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The fs names come from the JSON: keep them from naming another directory.
fn file_safe(name: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    name.chars()
        .map(|c| if safe(c) { c } else { '_' })
        .collect()
}

/// Picks the charts out of a results value: per fs, the workloads in the
/// order of meta.workloads (then any others), targets in the order of
/// meta.targets (then extras such as strata-image-ro), native left out.
fn charts(json: &Value) -> Result<Vec<FsChart>, String> {
    let summary = json
        .get("summary")
        .and_then(Value::as_object)
        .ok_or("no \"summary\" object")?;
    let meta = json.get("meta");
    let names = |key: &str| -> Vec<String> {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let str_at = |ptr: &str| meta.and_then(|m| m.pointer(ptr)).and_then(Value::as_str);
    // "2026-11-21T18:34:35+00:00" -> "2026-11-21 18:34"; anything else as is.
    let date = str_at("/date").map(|d| d.get(..16).unwrap_or(d).replacen('T', " ", 1));
    let subtitle = [
        date,
        str_at("/machine/strata_git").map(|g| format!("git {g}")),
        str_at("/mode").map(|m| format!("{m} run")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" · ");

    let mut out = Vec::new();
    for (fs, by_workload) in summary {
        let Some(by_workload) = by_workload.as_object() else {
            continue;
        };
        let workloads = ordered(names("workloads"), by_workload.keys());
        let rows = by_workload.values().filter_map(Value::as_object);
        let mut targets = ordered(names("targets"), rows.flat_map(|r| r.keys()));
        targets.retain(|t| t != "native");

        let mut groups = Vec::new();
        for w in workloads {
            let Some(rows) = by_workload.get(&w) else {
                continue;
            };
            let bars: Vec<Bar> = targets
                .iter()
                .filter_map(|t| {
                    // null (no native value, e.g. rss): no bar. Neither for 0,
                    // negative or absurd values, which would stretch the
                    // axis over hundreds of decades.
                    let ratio = rows.get(t)?.get("ratio")?.as_f64()?;
                    let target = t.clone();
                    (1e-6..=1e6)
                        .contains(&ratio)
                        .then_some(Bar { target, ratio })
                })
                .collect();
            if !bars.is_empty() {
                groups.push(Group { workload: w, bars });
            }
        }
        if groups.is_empty() {
            continue;
        }
        // The legend names only targets that have a bar here.
        targets.retain(|t| groups.iter().any(|g| g.bars.iter().any(|b| &b.target == t)));
        out.push(FsChart {
            fs: fs.clone(),
            subtitle: subtitle.clone(),
            targets,
            groups,
        });
    }
    if out.is_empty() {
        return Err("no ratios to chart in \"summary\"".into());
    }
    Ok(out)
}

/// `first` (names from meta) where they occur in `present`, then the rest of
/// `present` in its own order.
fn ordered<'a>(first: Vec<String>, present: impl Iterator<Item = &'a String>) -> Vec<String> {
    let present: Vec<&String> = present.collect();
    let mut out: Vec<String> = first.into_iter().filter(|n| present.contains(&n)).collect();
    for n in present {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

/// "6.2x", "430x"; near native two decimals ("1.32x" vs "1.40x" is the
/// difference people look for there); below 1 two significant digits
/// ("0.52x", "0.0023x"), so a 400-times-faster image mount does not read "0.0x".
fn fmt_ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 2.0 {
        format!("{r:.1}x")
    } else if r >= 1.0 {
        format!("{r:.2}x")
    } else {
        let decimals = (-r.log10()).floor() as usize + 2;
        format!("{r:.decimals$}x")
    }
}

/// The x axis: whole decades around every ratio and 1x, with room for labels.
fn decades(groups: &[Group]) -> (i32, i32) {
    let ratios = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.ratio));
    let (lo, hi) = ratios.fold((1.0f64, 1.0f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let lo = (lo / LABEL_ROOM).log10().floor() as i32;
    let hi = (hi * LABEL_ROOM).log10().ceil() as i32;
    (lo, hi)
}

/// The y axis: bar heights counted from the top down (the first workload on
/// top), whose only key points are the group centres, so the mesh puts one
/// tick and one workload name on each group. (plotters' own key point
/// combinators drop the default formatting configure_mesh insists on.)
struct Rows {
    total: f64,
    keys: Vec<f64>,
}

impl Ranged for Rows {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    /// `limit` is (bottom, top) in pixels: 0 maps to the top.
    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = f64::from(limit.0 - limit.1);
        limit.1 + (value / self.total * span).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.total
    }
}

fn render(chart: &FsChart) -> Result<String, String> {
    // Legend entries flow left to right and wrap, so its height depends on the names.
    let legend_w = |t: &str| 40 + 7 * t.len() as u32;
    let mut legend = Vec::new(); // (target, x, row)
    let (mut x, mut row) = (0u32, 0u32);
    for t in &chart.targets {
        if x > 0 && x + legend_w(t) > WIDTH - 40 {
            (x, row) = (0, row + 1);
        }
        legend.push((t.as_str(), x, row));
        x += legend_w(t);
    }
    let legend_px = LEGEND_ROW_PX * (row + 1) + 8;

    // y is counted in bar heights from the top (see Rows): each group takes one
    // unit per bar plus a gap, and bars stay in target order inside their group.
    let mut centres = Vec::new();
    let mut y = GROUP_GAP / 2.0;
    for g in &chart.groups {
        centres.push(y + g.bars.len() as f64 / 2.0);
        y += g.bars.len() as f64 + GROUP_GAP;
    }
    let total = y - GROUP_GAP / 2.0;
    let plot_px = (total * f64::from(BAR_PX)).ceil() as u32 + 10;
    let height = HEADER_PX + legend_px + plot_px + AXIS_PX;
    let longest = chart.groups.iter().map(|g| g.workload.len()).max();
    let label_px = 20 + 7 * longest.unwrap_or(0) as u32;

    let mut svg = String::new();
    {
        // The backend borrows svg until it is dropped at the end of this block.
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let (header, body) = root.split_vertically(HEADER_PX + legend_px);

        let title = format!(
            "strata benchmarks, {}: ratio to native (>1 = slower)",
            chart.fs
        );
        let bold = (FONT, 22).into_font().style(FontStyle::Bold);
        header.draw(&Text::new(title, (20, 12), bold)).map_err(e)?;
        let grey = (FONT, 15).into_font().color(&RGBColor(90, 90, 90));
        header
            .draw(&Text::new(chart.subtitle.as_str(), (20, 38), grey))
            .map_err(e)?;
        let centred = |size| {
            TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Left, VPos::Center))
        };
        for (t, x, row) in &legend {
            let (x, y) = (20 + *x as i32, (HEADER_PX + row * LEGEND_ROW_PX) as i32);
            let swatch = Rectangle::new([(0, 0), (14, 14)], colour(t).filled());
            let name = Text::new(t.to_string(), (20, 7), centred(15));
            header
                .draw(&(EmptyElement::at((x, y)) + swatch + name))
                .map_err(e)?;
        }

        let (lo, hi) = decades(&chart.groups);
        let decade = |k: i32| 10f64.powi(k);
        // Ticks and grid lines at decades (labelled) and at 2 and 5 times them
        // (grid only). Key point functions rather than with_key_points(), which
        // would lose the axes' default formatting that configure_mesh requires.
        let bold: Vec<f64> = (lo..=hi).map(decade).collect();
        let light: Vec<f64> = (lo..hi)
            .flat_map(|k| [2.0 * decade(k), 5.0 * decade(k)])
            .collect();
        let x_axis = (decade(lo)..decade(hi))
            .log_scale()
            .with_key_point_func(move |_| bold.clone())
            .with_light_point_func(move |_| light.clone());
        let y_axis = Rows {
            total,
            keys: centres.clone(),
        };
        let mut cc = ChartBuilder::on(&body)
            .margin_right(30)
            .x_label_area_size(AXIS_PX)
            .y_label_area_size(label_px)
            .build_cartesian_2d(x_axis, y_axis)
            .map_err(e)?;

        let x_fmt = |v: &f64| {
            let k = v.log10().round() as i32;
            if k >= 0 {
                format!("{}x", decade(k))
            } else {
                format!("{:.*}x", (-k) as usize, decade(k))
            }
        };
        let y_fmt = |v: &f64| {
            let i = centres.iter().position(|k| (k - v).abs() < 1e-9);
            i.map(|i| chart.groups[i].workload.clone())
                .unwrap_or_default()
        };
        let has_images = chart
            .groups
            .iter()
            .any(|g| g.workload.starts_with("image-"));
        cc.configure_mesh()
            .disable_y_mesh()
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 15))
            .x_desc(if has_images {
                "ratio to native, log scale (image-*: to the baseline named in BENCHMARKS.md)"
            } else {
                "ratio to native, log scale (times: target / native; IOPS: native / target)"
            })
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(e)?;

        // The 1x line first, so the marks of bars at about 1x stay on top of it.
        let one = PathElement::new([(1.0, 0.0), (1.0, total)], BLACK.stroke_width(2));
        cc.draw_series([one]).map_err(e)?;
        // Bars grow from 1x, to the right when slower and to the left when faster:
        // on a log axis that length is what means something, not the distance from
        // the axis' arbitrary left end.
        let half = (f64::from(BAR_PX) * 0.4).round() as i32;
        for (g, centre) in chart.groups.iter().zip(&centres) {
            let top = centre - g.bars.len() as f64 / 2.0;
            for (i, b) in g.bars.iter().enumerate() {
                let (y0, y1) = (top + i as f64 + 0.1, top + i as f64 + 0.9);
                let fill = colour(&b.target).filled();
                cc.draw_series([Rectangle::new([(1.0, y0), (b.ratio, y1)], fill)])
                    .map_err(e)?;
                // A bar at about 1x has no length: a 4 px mark at its end keeps
                // its colour visible, so its label is not left floating.
                let mark = Rectangle::new([(-2, -half), (2, half)], fill);
                let (h, dx) = if b.ratio >= 1.0 {
                    (HPos::Left, 5)
                } else {
                    (HPos::Right, -5)
                };
                let style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(h, VPos::Center));
                let label = Text::new(fmt_ratio(b.ratio), (dx, 0), style);
                let end = EmptyElement::at((b.ratio, (y0 + y1) / 2.0));
                cc.draw_series([end + mark + label]).map_err(e)?;
            }
        }
        root.present().map_err(e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn results() -> Value {
        let cell = |median: f64, ratio: Value| json!({"median": median, "n": 5, "ratio": ratio});
        json!({
            "meta": {"date": "2026-11-21T18:34:35+00:00", "mode": "full",
                     "targets": ["native", "strata", "mergerfs"],
                     "workloads": ["ls-cold", "small-read", "rss"],
                     "machine": {"strata_git": "abc1234"}},
            "summary": {"tmpfs": {
                // Deliberately not in meta order: the chart follows meta.workloads.
                "small-read": {"native": cell(0.03, json!(1.0)), "strata": cell(0.19, json!(6.2)),
                               "mergerfs": cell(0.8, json!(25.3))},
                "ls-cold": {"native": cell(0.04, json!(1.0)), "strata": cell(0.02, json!(0.5)),
                            "strata-image-ro": cell(0.05, json!(1.25))},
                "rss": {"strata": cell(30.0, Value::Null)}
            }},
            "errors": [], "samples": []
        })
    }

    #[test]
    fn renders_one_svg_per_fs_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("results.json");
        std::fs::write(&src, results().to_string()).unwrap();
        let out = dir.path().join("out");
        let paths = run(&src, &out).unwrap();
        assert_eq!(paths, vec![out.join("benchmarks-tmpfs.svg")]);
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Text elements (plotters puts the text on a line of its own),
        // matched whole: the legend, the workloads on the y
        // axis, the bar labels and a decade of the x axis.
        let texts = [
            "strata",
            "mergerfs",
            "strata-image-ro",
            "ls-cold",
            "small-read",
            "6.2x",
            "25.3x",
            "0.50x",
            "1.25x",
            "1x",
            "10x",
        ];
        for want in texts {
            assert!(
                svg.contains(&format!(">\n{want}\n</text>")),
                "{want} missing from the SVG"
            );
        }
        assert!(svg.contains("git abc1234"));
        assert!(
            !svg.contains("\nrss\n"),
            "rss has no ratio and gets no group"
        );
        assert!(
            !svg.contains("\nnative\n"),
            "native is the baseline, not a bar"
        );
    }

    #[test]
    fn orders_workloads_and_targets_as_meta_says() {
        let charts = charts(&results()).unwrap();
        let c = &charts[0];
        let workloads: Vec<_> = c.groups.iter().map(|g| g.workload.as_str()).collect();
        assert_eq!(workloads, ["ls-cold", "small-read"]);
        assert_eq!(c.targets, ["strata", "mergerfs", "strata-image-ro"]);
        assert_eq!(c.subtitle, "2026-11-21 18:34 · git abc1234 · full run");
    }

    #[test]
    fn bad_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        assert!(run(&dir.path().join("missing.json"), &out).is_err());
        for bad in [
            "{not json",
            "[]",
            r#"{"meta": {}}"#,
            r#"{"summary": 3}"#,
            r#"{"summary": {"tmpfs": {"rss": {"strata": {"ratio": null}}}}}"#,
            r#"{"summary": {"tmpfs": {"w": {"a": {"ratio": 1e300}, "b": {"ratio": -1}}}}}"#,
            r#"{"summary": {"tmpfs": {"w": {"a": {"ratio": "2x"}, "b": 7}, "v": []}}}"#,
        ] {
            let src = dir.path().join("bad.json");
            std::fs::write(&src, bad).unwrap();
            let err = run(&src, &out).unwrap_err();
            assert!(err.contains("bad.json"), "{err}");
        }
        assert!(!out.join("benchmarks-tmpfs.svg").exists());

        // Good input, but OUT_DIR cannot be made.
        let src = dir.path().join("results.json");
        std::fs::write(&src, results().to_string()).unwrap();
        assert!(run(&src, &src.join("out")).is_err());
    }

    #[test]
    fn ratio_labels_and_axis_decades() {
        assert_eq!(fmt_ratio(6.2), "6.2x");
        assert_eq!(fmt_ratio(1.0009), "1.00x");
        assert_eq!(fmt_ratio(1.398), "1.40x");
        assert_eq!(fmt_ratio(0.516), "0.52x");
        assert_eq!(fmt_ratio(0.00232), "0.0023x");
        assert_eq!(fmt_ratio(430.4), "430x");
        let g = |r: &[f64]| {
            vec![Group {
                workload: "w".into(),
                bars: r
                    .iter()
                    .map(|&ratio| Bar {
                        target: "t".into(),
                        ratio,
                    })
                    .collect(),
            }]
        };
        assert_eq!(decades(&g(&[0.52, 55.2])), (-1, 2));
        assert_eq!(decades(&g(&[1.3])), (-1, 1));
        assert_eq!(decades(&g(&[0.0023, 1.8])), (-3, 1));
        assert_eq!(file_safe("../x y"), "___x_y");
    }
}
