//! Hand-written SVG chart of decode tok/s against the memory budget, with the floor drawn in.

use std::fmt::Write;

/// One line of the chart: a name, a colour, and a value per x category (None: no point).
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    pub values: Vec<Option<f64>>,
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Categories along x (budgets, in config order), tok/s up y on a linear scale from 0.
pub fn tok_s_vs_budget(title: &str, subtitle: &str, xs: &[String], series: &[Series]) -> String {
    let (w, h) = (900.0f64, 480.0f64);
    let (left, right, top, bottom) = (70.0, 190.0, 60.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let ymax = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let ymax = nice_ceiling(ymax.max(1e-6));
    let n = xs.len().max(1);
    let x_at = |i: usize| left + pw * (i as f64 + 0.5) / n as f64;
    let y_at = |v: f64| top + ph * (1.0 - (v / ymax).clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15">{}</text><text x="10" y="42" fill="#555">{}</text>"##,
        xml(title),
        xml(subtitle)
    );
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        let y = y_at(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">decode tokens/s</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_at(i),
            top + ph + 18.0,
            xml(x)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">device budget (--vram-budget)</text>"#,
        left + pw / 2.0,
        h - 14.0
    );
    for (k, ser) in series.iter().enumerate() {
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let pts: Vec<String> = ser
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.filter(|v| v.is_finite())
                    .map(|v| format!("{:.1},{:.1}", x_at(i), y_at(v)))
            })
            .collect();
        if pts.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                pts.join(" "),
                ser.color
            );
        }
        for (i, v) in ser.values.iter().enumerate() {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"><title>{} at {}: {} tok/s</title></circle>"#,
                    x_at(i),
                    y_at(v),
                    ser.color,
                    xml(&ser.name),
                    xml(xs.get(i).map_or("", String::as_str)),
                    fmt_num(v)
                );
            }
        }
        let ly = top + 10.0 + 22.0 * k as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            ser.color,
            lx + 30.0,
            ly + 4.0,
            xml(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_point_per_value_and_a_dashed_floor() {
        let svg = tok_s_vs_budget(
            "t",
            "s",
            &["64MiB".into(), "auto".into()],
            &[
                Series {
                    name: "flea".into(),
                    color: "#59a14f",
                    dashed: false,
                    values: vec![Some(3.0), Some(30.0)],
                },
                Series {
                    name: "floor".into(),
                    color: "#e15759",
                    dashed: true,
                    values: vec![Some(4.0), None],
                },
            ],
        );
        assert_eq!(svg.matches("<circle").count(), 3);
        assert_eq!(svg.matches("stroke-dasharray").count(), 1);
        assert_eq!(nice_ceiling(30.0), 50.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
    }
}
