//! The benchmark's plots, as SVG files for `docs/`.
//!
//! Text: plotters is built with only its `svg_backend` feature, no font feature (`ttf`,
//! `ab_glyph`). Without one it uses its built-in "naive" font: the extent of a label, for
//! layout, is estimated from its length, and the SVG backend writes every label as a
//! `<text>` element with a generic `font-family` (`sans-serif`), drawn by whatever shows
//! the SVG with the fonts it has. Nothing reads a font at build or run time, and nothing
//! but `plotters-svg` and `num-traits` is built. `ttf` (a default feature) would pull in
//! font-kit, which links fontconfig and looks fonts up on the system: a bare machine has
//! neither its library nor fonts, and the SVG would still only say `font-family`. It
//! would only sharpen the estimate. `ab_glyph` needs a font file registered at run time,
//! which the repository does not ship. The estimate is crude (about 0.56 em a character,
//! DejaVu Sans's average), so the layouts leave room for labels.
//!
//! Every plot is a pure function of its data: the same figures give the same bytes.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::results::{LoadMode, RunFigures, TargetFigures, Timeline};
use crate::stats::median_f;

const FONT: &str = "sans-serif";
/// Point sizes as plotters takes them (the SVG gets `size / 1.24` px).
const TITLE_SIZE: f64 = 26.0;
const CAPTION_SIZE: f64 = 21.0;
const LABEL_SIZE: f64 = 16.0;
const SMALL_SIZE: f64 = 14.0;

/// lb's own targets, so they stand out.
const LB: RGBColor = RGBColor(230, 97, 0);
const LB_LIGHT: RGBColor = RGBColor(249, 178, 120);
/// Every other balancer.
const OTHER: RGBColor = RGBColor(49, 104, 163);
const OTHER_LIGHT: RGBColor = RGBColor(150, 188, 228);
/// No balancer at all.
const DIRECT: RGBColor = RGBColor(128, 128, 128);
const DIRECT_LIGHT: RGBColor = RGBColor(200, 200, 200);
const INK: RGBColor = RGBColor(40, 40, 40);
const FAILED: RGBColor = RGBColor(204, 0, 0);
/// The failover timeline's localities, in priority order (cycled past the end).
const LOCALITY_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Which kind of target a name is: colors and legends follow it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lb,
    Other,
    Direct,
}

impl Kind {
    fn of(target: &str) -> Kind {
        if target == "direct" || target.starts_with("direct ") {
            Kind::Direct
        } else if target == "lb" || target.starts_with("lb ") {
            Kind::Lb
        } else {
            Kind::Other
        }
    }

    /// (main color, light color)
    fn colors(self) -> (RGBColor, RGBColor) {
        match self {
            Kind::Lb => (LB, LB_LIGHT),
            Kind::Other => (OTHER, OTHER_LIGHT),
            Kind::Direct => (DIRECT, DIRECT_LIGHT),
        }
    }
}

/// Median, min and max of one figure over the rounds of one target.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// `None` when no round has a finite value.
    fn of(values: Vec<f64>) -> Option<Spread> {
        let values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // The tables' median (stats::median_f), so a plot agrees with its table.
        Some(Spread {
            median: median_f(values),
            min,
            max,
        })
    }
}

/// The targets measured in `mode`, in order of first appearance, each with the rounds of
/// every entry for it (normally one).
fn rounds_by_target(figures: &[TargetFigures], mode: LoadMode) -> Vec<(&str, Vec<&RunFigures>)> {
    let mut out: Vec<(&str, Vec<&RunFigures>)> = Vec::new();
    for f in figures.iter().filter(|f| f.mode == mode) {
        match out.iter_mut().find(|(t, _)| *t == f.target) {
            Some((_, rounds)) => rounds.extend(&f.rounds),
            None => out.push((&f.target, f.rounds.iter().collect())),
        }
    }
    out
}

/// One figure per target in `mode`: the spread of `value` over the rounds.
fn spreads(
    figures: &[TargetFigures],
    mode: LoadMode,
    value: impl Fn(&RunFigures) -> f64,
) -> Vec<(String, Option<Spread>)> {
    rounds_by_target(figures, mode)
        .into_iter()
        .map(|(t, rounds)| {
            (
                t.to_string(),
                Spread::of(rounds.into_iter().map(&value).collect()),
            )
        })
        .collect()
}

/// The kinds of target in `figures`.
fn kinds(figures: &[TargetFigures]) -> Vec<Kind> {
    figures.iter().map(|f| Kind::of(&f.target)).collect()
}

/// Most rounds of any target in any mode, for the subtitle.
fn max_rounds(figures: &[TargetFigures]) -> usize {
    let mut modes: Vec<LoadMode> = figures.iter().map(|f| f.mode).collect();
    modes.sort();
    modes.dedup();
    modes
        .into_iter()
        .flat_map(|m| rounds_by_target(figures, m))
        .map(|(_, r)| r.len())
        .max()
        .unwrap_or(0)
}

/// A count with 3 significant digits and a k/M suffix: `48.2k`, `1.23M`, `950`.
fn si(v: f64) -> String {
    let (scaled, suffix) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if scaled.abs() >= 100.0 {
        format!("{scaled:.0}")
    } else if scaled.abs() >= 10.0 {
        format!("{scaled:.1}")
    } else {
        format!("{scaled:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{suffix}")
}

/// Microseconds for an axis tick.
fn micros(v: f64) -> String {
    if v == 0.0 || v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.1}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Width in px of `text` at plotters size `size`, as the naive font estimates it (the
/// same estimate plotters lays out with).
fn text_width(text: &str, size: f64) -> i32 {
    (size / 1.24 / 1.24 * 0.7 * text.chars().count() as f64).round() as i32
}

fn style(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().color(&INK)
}

fn anchored(size: f64, h: HPos, v: VPos) -> TextStyle<'static> {
    style(size).pos(Pos::new(h, v))
}

/// Renders into an SVG string, then writes it to `path` (creating its directory).
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// The plot's title and a line under it.
fn heading(root: &Area, title: &str, subtitle: &str) -> Result<()> {
    let w = root.dim_in_pixel().0 as i32;
    root.draw(&Text::new(
        title.to_string(),
        (w / 2, 12),
        anchored(TITLE_SIZE, HPos::Center, VPos::Top),
    ))?;
    if !subtitle.is_empty() {
        root.draw(&Text::new(
            subtitle.to_string(),
            (w / 2, 44),
            anchored(SMALL_SIZE, HPos::Center, VPos::Top),
        ))?;
    }
    Ok(())
}

/// What a legend entry's sample looks like.
enum Swatch {
    Fill(RGBColor),
    /// Two bars side by side: (left, right).
    Pair(RGBColor, RGBColor),
    Dash(RGBColor),
    Whisker,
}

/// A row of legend entries, centered at height `y`.
fn legend(root: &Area, y: i32, entries: &[(Swatch, String)]) -> Result<()> {
    const SAMPLE: i32 = 22;
    const GAP: i32 = 8;
    const SPACE: i32 = 30;
    let width: i32 = entries
        .iter()
        .map(|(_, t)| SAMPLE + GAP + text_width(t, LABEL_SIZE) + SPACE)
        .sum::<i32>()
        - SPACE;
    let mut x = (root.dim_in_pixel().0 as i32 - width) / 2;
    for (swatch, text) in entries {
        match swatch {
            Swatch::Fill(c) => root.draw(&Rectangle::new(
                [(x + 2, y - 8), (x + SAMPLE - 2, y + 8)],
                c.filled(),
            ))?,
            Swatch::Pair(a, b) => {
                root.draw(&Rectangle::new(
                    [(x + 1, y - 8), (x + 10, y + 8)],
                    a.filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x + 12, y - 8), (x + 21, y + 8)],
                    b.filled(),
                ))?;
            }
            Swatch::Dash(c) => root.draw(&DashedPathElement::new(
                vec![(x, y), (x + SAMPLE, y)],
                6,
                4,
                c.stroke_width(2),
            ))?,
            Swatch::Whisker => {
                let mid = x + SAMPLE / 2;
                let ink = INK.stroke_width(2);
                root.draw(&PathElement::new(vec![(mid, y - 9), (mid, y + 9)], ink))?;
                root.draw(&PathElement::new(
                    vec![(mid - 6, y - 9), (mid + 6, y - 9)],
                    ink,
                ))?;
                root.draw(&PathElement::new(
                    vec![(mid - 6, y + 9), (mid + 6, y + 9)],
                    ink,
                ))?;
            }
        }
        x += SAMPLE + GAP;
        root.draw(&Text::new(
            text.clone(),
            (x, y),
            anchored(LABEL_SIZE, HPos::Left, VPos::Center),
        ))?;
        x += text_width(text, LABEL_SIZE) + SPACE;
    }
    Ok(())
}

/// A panel with nothing measured: its caption and a note.
fn empty_panel(area: &Area, caption: &str) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        caption.to_string(),
        (w as i32 / 2, 13),
        anchored(CAPTION_SIZE, HPos::Center, VPos::Top),
    ))?;
    area.draw(&Text::new(
        "not measured".to_string(),
        (w as i32 / 2, h as i32 / 2),
        anchored(LABEL_SIZE, HPos::Center, VPos::Center),
    ))?;
    Ok(())
}

/// A linear axis whose ticks (labels and grid lines) are exactly `keys`: the categories
/// of a bar chart or a timeline's rows. (plotters' own `with_key_points` on an f64 range
/// cannot take a label formatter.)
#[derive(Clone)]
struct Keyed {
    range: Range<f64>,
    keys: Vec<f64>,
}

impl Ranged for Keyed {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(self.range.clone()).map(v, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Only bold points: no light grid lines between them.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// The categorical x axis of a bar chart: one slot per target, centered on 0, 1, ...
fn slots(n: usize) -> Keyed {
    Keyed {
        range: -0.5..n as f64 - 0.5,
        keys: (0..n).map(|i| i as f64).collect(),
    }
}

/// The target under an x key point.
fn slot_name(names: &[String], x: f64) -> String {
    let i = x.round();
    if i >= 0.0 && (i as usize) < names.len() {
        names[i as usize].clone()
    } else {
        String::new()
    }
}

/// Left label area wide enough for the tick labels and the axis description.
fn y_label_width(ticks: &[String]) -> u32 {
    let widest = ticks
        .iter()
        .map(|t| text_width(t, LABEL_SIZE))
        .max()
        .unwrap_or(0);
    (widest + 40).max(64) as u32
}

/// Requests (or connections) per second per target, one panel per mode.
pub fn throughput(figures: &[TargetFigures], path: &Path) -> Result<()> {
    let rounds = max_rounds(figures);
    render(path, (1400, 640), |root| {
        heading(
            root,
            "Throughput through each balancer (higher is better)",
            &format!(
                "bar: median over {rounds} round{}{}; figure above a bar: its median",
                if rounds == 1 { "" } else { "s" },
                if rounds > 1 {
                    "; whisker: min–max over the rounds"
                } else {
                    ""
                },
            ),
        )?;
        let kinds = kinds(figures);
        let mut entries = Vec::new();
        if kinds.contains(&Kind::Lb) {
            entries.push((Swatch::Fill(LB), "lb".to_string()));
        }
        if kinds.contains(&Kind::Other) {
            entries.push((Swatch::Fill(OTHER), "other balancers".to_string()));
        }
        if kinds.contains(&Kind::Direct) {
            entries.push((Swatch::Fill(DIRECT), "direct (no balancer)".to_string()));
            entries.push((Swatch::Dash(DIRECT), "direct's level".to_string()));
        }
        if rounds > 1 {
            entries.push((Swatch::Whisker, "min–max over rounds".to_string()));
        }
        legend(root, 80, &entries)?;
        let panels = root.margin(105, 5, 10, 20).split_evenly((1, 2));
        for (area, mode, unit) in [
            (&panels[0], LoadMode::KeepAlive, "requests/s"),
            (&panels[1], LoadMode::NewConnection, "connections/s"),
        ] {
            let caption = format!("{}: {unit}", mode.label());
            let bars = spreads(figures, mode, |r| r.requests_per_s);
            throughput_panel(area, &caption, unit, &bars)?;
        }
        Ok(())
    })
}

fn throughput_panel(
    area: &Area,
    caption: &str,
    unit: &str,
    bars: &[(String, Option<Spread>)],
) -> Result<()> {
    if bars.is_empty() {
        return empty_panel(area, caption);
    }
    let names: Vec<String> = bars.iter().map(|(n, _)| n.clone()).collect();
    let top = bars
        .iter()
        .filter_map(|(_, s)| s.map(|s| s.max))
        .fold(0.0, f64::max);
    // Room above the tallest whisker for its figure.
    let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
    let ticks: Vec<String> = (0..=10).map(|i| si(y_max * i as f64 / 10.0)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, style(CAPTION_SIZE))
        .margin(8)
        .x_label_area_size(40)
        .y_label_area_size(y_label_width(&ticks))
        .build_cartesian_2d(slots(bars.len()), 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .y_labels(8)
        .x_label_formatter(&|x| slot_name(&names, *x))
        .y_label_formatter(&|y| si(*y))
        .y_desc(unit)
        .label_style(style(LABEL_SIZE))
        .axis_desc_style(style(LABEL_SIZE))
        .draw()?;

    let n = bars.len() as f64;
    // direct's level across the panel, under the bars.
    if let Some((_, Some(direct))) = bars.iter().find(|(t, _)| Kind::of(t) == Kind::Direct) {
        chart.draw_series(std::iter::once(DashedPathElement::new(
            vec![(-0.5, direct.median), (n - 0.5, direct.median)],
            6,
            4,
            DIRECT.stroke_width(2),
        )))?;
    }
    for (i, (target, spread)) in bars.iter().enumerate() {
        let x = i as f64;
        let Some(s) = spread else {
            chart.draw_series(std::iter::once(
                EmptyElement::at((x, 0.0))
                    + Text::new(
                        "no data".to_string(),
                        (0, -6),
                        anchored(SMALL_SIZE, HPos::Center, VPos::Bottom),
                    ),
            ))?;
            continue;
        };
        let (color, _) = Kind::of(target).colors();
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x - 0.32, 0.0), (x + 0.32, s.median)],
            color.filled(),
        )))?;
        if s.max > s.min {
            whisker(&mut chart, x, 0.1, s)?;
        }
        // On white, so direct's dashed line does not run through it.
        let figure = si(s.median);
        let half = text_width(&figure, SMALL_SIZE) / 2 + 3;
        chart.draw_series(std::iter::once(
            EmptyElement::at((x, s.max))
                + Rectangle::new([(-half, -21), (half, -4)], WHITE.filled())
                + Text::new(
                    figure,
                    (0, -6),
                    anchored(SMALL_SIZE, HPos::Center, VPos::Bottom),
                ),
        ))?;
    }
    Ok(())
}

type BarChart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Keyed, RangedCoordf64>>;

/// A min–max whisker at `x`, caps `half` wide each side.
fn whisker(chart: &mut BarChart, x: f64, half: f64, s: &Spread) -> Result<()> {
    let ink = INK.stroke_width(2);
    chart.draw_series([
        PathElement::new(vec![(x, s.min), (x, s.max)], ink),
        PathElement::new(vec![(x - half, s.min), (x + half, s.min)], ink),
        PathElement::new(vec![(x - half, s.max), (x + half, s.max)], ink),
    ])?;
    Ok(())
}

/// p50 and p99 latency per target (medians over rounds), one panel per mode.
pub fn latency(figures: &[TargetFigures], path: &Path) -> Result<()> {
    let rounds = max_rounds(figures);
    render(path, (1400, 640), |root| {
        heading(
            root,
            "Request latency through each balancer (lower is better)",
            &format!(
                "each bar: the median over {rounds} round{} of that round's percentile; \
                 new connection per request: connect to the last byte of the response",
                if rounds == 1 { "" } else { "s" }
            ),
        )?;
        legend(
            root,
            80,
            &[
                (Kind::Lb, "lb: p50, p99"),
                (Kind::Other, "other balancers: p50, p99"),
                (Kind::Direct, "direct (no balancer): p50, p99"),
            ]
            .into_iter()
            .filter(|(k, _)| kinds(figures).contains(k))
            .map(|(k, text)| {
                let (dark, light) = k.colors();
                (Swatch::Pair(light, dark), text.to_string())
            })
            .collect::<Vec<_>>(),
        )?;
        let panels = root.margin(105, 5, 10, 20).split_evenly((1, 2));
        for (area, mode) in [
            (&panels[0], LoadMode::KeepAlive),
            (&panels[1], LoadMode::NewConnection),
        ] {
            let caption = format!("{}: p50 and p99 (µs)", mode.label());
            let p50 = spreads(figures, mode, |r| r.p50_us);
            let p99 = spreads(figures, mode, |r| r.p99_us);
            latency_panel(area, &caption, &p50, &p99)?;
        }
        Ok(())
    })
}

fn latency_panel(
    area: &Area,
    caption: &str,
    p50: &[(String, Option<Spread>)],
    p99: &[(String, Option<Spread>)],
) -> Result<()> {
    if p50.is_empty() {
        return empty_panel(area, caption);
    }
    let names: Vec<String> = p50.iter().map(|(n, _)| n.clone()).collect();
    let top = p50
        .iter()
        .chain(p99)
        .filter_map(|(_, s)| s.map(|s| s.median))
        .fold(0.0, f64::max);
    let y_max = if top > 0.0 { top * 1.08 } else { 1.0 };
    let ticks: Vec<String> = (0..=10).map(|i| micros(y_max * i as f64 / 10.0)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, style(CAPTION_SIZE))
        .margin(8)
        .x_label_area_size(40)
        .y_label_area_size(y_label_width(&ticks))
        .build_cartesian_2d(slots(p50.len()), 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .y_labels(8)
        .x_label_formatter(&|x| slot_name(&names, *x))
        .y_label_formatter(&|y| micros(*y))
        .y_desc("latency (µs)")
        .label_style(style(LABEL_SIZE))
        .axis_desc_style(style(LABEL_SIZE))
        .draw()?;
    for (i, ((target, p50), (_, p99))) in p50.iter().zip(p99).enumerate() {
        let x = i as f64;
        let (dark, light) = Kind::of(target).colors();
        if p50.is_none() && p99.is_none() {
            chart.draw_series(std::iter::once(
                EmptyElement::at((x, 0.0))
                    + Text::new(
                        "no data".to_string(),
                        (0, -6),
                        anchored(SMALL_SIZE, HPos::Center, VPos::Bottom),
                    ),
            ))?;
        }
        for (s, from, to, color) in [
            (p50, x - 0.36, x - 0.02, light),
            (p99, x + 0.02, x + 0.36, dark),
        ] {
            if let Some(s) = s {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(from, 0.0), (to, s.median)],
                    color.filled(),
                )))?;
            }
        }
    }
    Ok(())
}

/// The failover timeline: which locality served each call while the localities were
/// drained one after another.
pub fn failover_timeline(t: &Timeline, path: &Path) -> Result<()> {
    // Rows top to bottom: the localities in priority order, any other that answered, then
    // the failed calls.
    let mut rows: Vec<String> = t.localities.clone();
    for c in &t.calls {
        if let Some(l) = &c.served_by {
            if !rows.contains(l) {
                rows.push(l.clone());
            }
        }
    }
    let failed_row = rows.len();
    rows.push("failed".to_string());
    let n_rows = rows.len();
    // Row r (0 at the top) sits at y = n_rows - 1 - r: "failed" at 0.
    let row_y = |r: usize| (n_rows - 1 - r) as f64;
    let row_of = |served_by: &Option<String>| match served_by {
        Some(l) => rows.iter().position(|r| r == l).unwrap_or(failed_row),
        None => failed_row,
    };

    // Headroom above the top row for the drains' labels, in px.
    const ROW_PX: u32 = 48;
    const HEADROOM_PX: u32 = 66;
    const LABEL_LEVEL_PX: i32 = 19;
    let height = 120 + HEADROOM_PX + ROW_PX * n_rows as u32 + 80;
    let failed = t.calls.iter().filter(|c| c.served_by.is_none()).count();
    let end = t
        .calls
        .iter()
        .map(|c| c.at_ms)
        .chain(t.drains.iter().map(|d| d.0))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let x_max = if end > 0.0 { end * 1.03 } else { 1.0 };
    let headroom_rows = HEADROOM_PX as f64 / ROW_PX as f64;
    let y_top = n_rows as f64 - 0.5 + headroom_rows;

    render(path, (1400, height), |root| {
        heading(
            root,
            "Failover: the locality that served each call while localities are drained in turn",
            &format!(
                "{} call{} on new connections, {failed} failed; one dot per call, at its \
                 start, in the row of the locality that answered; dashed: a drain",
                t.calls.len(),
                if t.calls.len() == 1 { "" } else { "s" }
            ),
        )?;
        let area = root.margin(80, 10, 10, 30);
        let y_keys: Vec<f64> = (0..n_rows).map(row_y).collect();
        let ticks: Vec<String> = rows.clone();
        let mut chart = ChartBuilder::on(&area)
            .margin(8)
            .x_label_area_size(60)
            .y_label_area_size(y_label_width(&ticks) - 30)
            .build_cartesian_2d(
                0.0..x_max,
                Keyed {
                    range: -0.5..y_top,
                    keys: y_keys,
                },
            )?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .x_labels(12)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                let r = n_rows as f64 - 1.0 - y.round();
                if r >= 0.0 && (r as usize) < n_rows {
                    rows[r as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("time since the timeline's start (ms)")
            .label_style(style(LABEL_SIZE))
            .axis_desc_style(style(LABEL_SIZE))
            .draw()?;

        // Drains: a dashed line each, labelled in the headroom; labels that would run
        // into the previous one on their level go one level up.
        let mut drains: Vec<&(f64, String)> = t.drains.iter().filter(|d| d.0.is_finite()).collect();
        drains.sort_by(|a, b| a.0.total_cmp(&b.0));
        let plot_right = chart.backend_coord(&(x_max, 0.0)).0;
        let mut level_ends: Vec<i32> = Vec::new();
        for (at, locality) in drains {
            chart.draw_series(std::iter::once(DashedPathElement::new(
                vec![
                    (*at, -0.5),
                    (*at, n_rows as f64 - 0.5 + headroom_rows * 0.6),
                ],
                7,
                5,
                INK.stroke_width(2),
            )))?;
            let label = format!("drain {locality}");
            let w = text_width(&label, SMALL_SIZE);
            let x_px = chart.backend_coord(&(*at, 0.0)).0;
            // Right of the line, or left of it near the right edge.
            let right_of_line = x_px + 5 + w <= plot_right;
            let (left, h, dx) = if right_of_line {
                (x_px + 5, HPos::Left, 5)
            } else {
                (x_px - 5 - w, HPos::Right, -5)
            };
            let level = level_ends
                .iter()
                .position(|&e| e + 8 <= left)
                .unwrap_or_else(|| {
                    if level_ends.len() < 3 {
                        level_ends.push(i32::MIN);
                        level_ends.len() - 1
                    } else {
                        0
                    }
                });
            level_ends[level] = left + w;
            chart.draw_series(std::iter::once(
                EmptyElement::at((*at, n_rows as f64 - 0.5 + headroom_rows * 0.6))
                    + Text::new(
                        label,
                        (dx, -4 - LABEL_LEVEL_PX * level as i32),
                        anchored(SMALL_SIZE, h, VPos::Bottom),
                    ),
            ))?;
        }

        // The calls; one mark per row and pixel column (more would only grow the file).
        let mut drawn = std::collections::HashSet::new();
        for c in t.calls.iter().filter(|c| c.at_ms.is_finite()) {
            let r = row_of(&c.served_by);
            if !drawn.insert((r, chart.backend_coord(&(c.at_ms, 0.0)).0)) {
                continue;
            }
            if r == failed_row {
                chart.draw_series(std::iter::once(Cross::new(
                    (c.at_ms, row_y(r)),
                    4,
                    FAILED.stroke_width(2),
                )))?;
            } else {
                let color = LOCALITY_COLORS[r % LOCALITY_COLORS.len()];
                chart.draw_series(std::iter::once(Circle::new(
                    (c.at_ms, row_y(r)),
                    3,
                    color.filled(),
                )))?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::TimelineCall;
    use std::path::PathBuf;

    const TARGETS: [&str; 7] = [
        "direct", "lb TC", "lb XDP", "iptables", "nftables", "HAProxy", "nginx",
    ];

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("lb-bench-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn made_up_figures() -> Vec<TargetFigures> {
        let mut out = Vec::new();
        for mode in [LoadMode::KeepAlive, LoadMode::NewConnection] {
            for (i, t) in TARGETS.iter().enumerate() {
                let base = match mode {
                    LoadMode::KeepAlive => 52_000.0 - 3_100.0 * i as f64,
                    LoadMode::NewConnection => 9_800.0 - 900.0 * i as f64,
                };
                let rounds = (0..5)
                    .map(|r| RunFigures {
                        requests_per_s: base * (1.0 + 0.02 * ((r * 7 + i) % 5) as f64 - 0.04),
                        p50_us: 60.0 + 9.0 * i as f64 + r as f64,
                        p99_us: 190.0 + 40.0 * i as f64 + 3.0 * r as f64,
                        errors: 0,
                        requests: 10_000,
                    })
                    .collect();
                out.push(TargetFigures {
                    target: t.to_string(),
                    mode,
                    rounds,
                });
            }
        }
        out
    }

    fn made_up_timeline() -> Timeline {
        let localities: Vec<String> = ["region1.zone1", "region1.zone2", "region2.zone1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let drains = vec![
            (1000.0, localities[0].clone()),
            (2000.0, localities[1].clone()),
        ];
        let calls = (0..300)
            .map(|i| {
                let at_ms = i as f64 * 10.0;
                let served_by = if i == 100 || i == 201 {
                    None
                } else if at_ms < 1000.0 {
                    Some(localities[0].clone())
                } else if at_ms < 2000.0 {
                    Some(localities[1].clone())
                } else {
                    Some(localities[2].clone())
                };
                TimelineCall { at_ms, served_by }
            })
            .collect();
        Timeline {
            calls,
            drains,
            localities,
        }
    }

    /// The contents of the SVG's `<text>` elements, trimmed and unescaped.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = t.split_once('>')?.1.split_once("</text>")?.0;
                Some(
                    body.trim()
                        .replace("&apos;", "'")
                        .replace("&quot;", "\"")
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&amp;", "&"),
                )
            })
            .collect()
    }

    fn has_text(svg: &str, text: &str) -> bool {
        texts(svg).iter().any(|t| t == text)
    }

    fn read_svg(path: &Path) -> String {
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(
            svg.starts_with("<svg"),
            "not an SVG: {}",
            &svg[..svg.len().min(80)]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        svg
    }

    #[test]
    fn throughput_and_latency_plots_name_every_target() {
        let dir = TempDir::new("plots-bars");
        let figures = made_up_figures();
        for (name, plot) in [
            (
                "throughput.svg",
                throughput as fn(&[TargetFigures], &Path) -> Result<()>,
            ),
            ("latency.svg", latency),
        ] {
            let path = dir.0.join(name);
            plot(&figures, &path).unwrap();
            let svg = read_svg(&path);
            for t in TARGETS {
                assert!(has_text(&svg, t), "{name}: no label {t}");
            }
            for mode in [LoadMode::KeepAlive, LoadMode::NewConnection] {
                assert!(svg.contains(mode.label()), "{name}: no panel for {mode:?}");
            }
            // Deterministic: the same data gives the same bytes.
            let again = dir.0.join(format!("again-{name}"));
            plot(&figures, &again).unwrap();
            assert_eq!(svg, read_svg(&again), "{name} differs between two renders");
        }
        let svg = read_svg(&dir.0.join("throughput.svg"));
        assert!(svg.contains("requests/s") && svg.contains("connections/s"));
        assert!(read_svg(&dir.0.join("latency.svg")).contains("µs"));
    }

    #[test]
    fn plots_cope_with_partial_and_empty_data() {
        let dir = TempDir::new("plots-partial");
        // Only keep-alive, one target without rounds, one with a single round.
        let figures = vec![
            TargetFigures {
                target: "lb XDP".into(),
                mode: LoadMode::KeepAlive,
                rounds: vec![RunFigures {
                    requests_per_s: 1000.0,
                    p50_us: 10.0,
                    p99_us: 20.0,
                    errors: 0,
                    requests: 10,
                }],
            },
            TargetFigures {
                target: "nginx".into(),
                mode: LoadMode::KeepAlive,
                rounds: vec![],
            },
        ];
        throughput(&figures, &dir.0.join("t.svg")).unwrap();
        latency(&figures, &dir.0.join("l.svg")).unwrap();
        let svg = read_svg(&dir.0.join("t.svg"));
        assert!(has_text(&svg, "nginx") && has_text(&svg, "no data"));
        assert!(
            has_text(&svg, "not measured"),
            "no note for the missing mode"
        );
        throughput(&[], &dir.0.join("t0.svg")).unwrap();
        latency(&[], &dir.0.join("l0.svg")).unwrap();
        failover_timeline(&Timeline::default(), &dir.0.join("f0.svg")).unwrap();
        assert!(has_text(&read_svg(&dir.0.join("f0.svg")), "failed"));
    }

    #[test]
    fn failover_timeline_names_every_locality_and_drain() {
        let dir = TempDir::new("plots-timeline");
        let t = made_up_timeline();
        let path = dir.0.join("nested/failover.svg");
        failover_timeline(&t, &path).unwrap();
        let svg = read_svg(&path);
        for l in &t.localities {
            assert!(has_text(&svg, l), "no row for {l}");
        }
        assert!(has_text(&svg, "failed"));
        assert!(has_text(&svg, "drain region1.zone1") && has_text(&svg, "drain region1.zone2"));
        let again = dir.0.join("again.svg");
        failover_timeline(&t, &again).unwrap();
        assert_eq!(svg, read_svg(&again));
    }

    #[test]
    fn si_formats_counts() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(2500.0), "2.5k");
        assert_eq!(si(48_213.0), "48.2k");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(micros(2.5), "2.5");
        assert_eq!(micros(120.4), "120");
    }

    /// Renders the made-up data into $LB_BENCH_PLOTS_DIR, to look at (ignored otherwise).
    #[test]
    fn render_samples_to_look_at() {
        let Some(dir) = std::env::var_os("LB_BENCH_PLOTS_DIR") else {
            return;
        };
        let dir = PathBuf::from(dir);
        throughput(&made_up_figures(), &dir.join("throughput.svg")).unwrap();
        latency(&made_up_figures(), &dir.join("latency.svg")).unwrap();
        failover_timeline(&made_up_timeline(), &dir.join("failover.svg")).unwrap();
        // Crowded drains, one near the right edge, and a locality outside the list.
        let mut t = made_up_timeline();
        t.drains = vec![
            (1000.0, "region1.zone1".into()),
            (1040.0, "region1.zone2".into()),
            (1080.0, "region2.zone1".into()),
            (2950.0, "region3.zone9".into()),
        ];
        t.calls[250].served_by = Some("elsewhere".into());
        failover_timeline(&t, &dir.join("failover-crowded.svg")).unwrap();
        let partial: Vec<TargetFigures> = made_up_figures()
            .into_iter()
            .filter(|f| f.mode == LoadMode::KeepAlive && f.target != "direct")
            .map(|mut f| {
                f.rounds.truncate(1);
                f.rounds[0].requests_per_s *= 40.0;
                f
            })
            .collect();
        throughput(&partial, &dir.join("throughput-partial.svg")).unwrap();
        latency(&partial, &dir.join("latency-partial.svg")).unwrap();
    }
}
