//! The `kvq eval --svg` chart: mean KLD (log scale) against bits per element, every point
//! labelled, the Pareto front (no other point has fewer bits and lower KLD) drawn as a line.
//! Written by hand so it needs no plotting crate and no system fonts.

use std::fmt::Write;

/// One configuration on the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub bits: f64,
    pub kld: f64,
}

/// Indices of the points on the Pareto front, by increasing bits.
pub fn pareto_front(points: &[Point]) -> Vec<usize> {
    let dominated = |i: usize| {
        points.iter().enumerate().any(|(j, q)| {
            let p = &points[i];
            j != i && q.bits <= p.bits && q.kld <= p.kld && (q.bits < p.bits || q.kld < p.kld)
        })
    };
    let mut front: Vec<usize> = (0..points.len()).filter(|&i| !dominated(i)).collect();
    front.sort_by(|&a, &b| points[a].bits.total_cmp(&points[b].bits));
    front
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The SVG document. Points whose KLD is not positive and finite cannot sit on a log axis
/// and are left out (the fp16 reference has KLD 0).
pub fn render(title: &str, points: &[Point]) -> String {
    let pts: Vec<Point> = points
        .iter()
        .filter(|p| p.kld > 0.0 && p.kld.is_finite() && p.bits.is_finite())
        .cloned()
        .collect();
    let (w, h) = (900.0, 560.0);
    let (left, right, top, bottom) = (80.0, 40.0, 50.0, 60.0);
    let max_bits = pts.iter().map(|p| p.bits).fold(1.0, f64::max).ceil() + 0.5;
    let lo = pts
        .iter()
        .map(|p| p.kld.log10())
        .fold(f64::INFINITY, f64::min);
    let hi = pts
        .iter()
        .map(|p| p.kld.log10())
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if pts.is_empty() {
        (-3.0, 0.0)
    } else {
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    };
    let x = |b: f64| left + (w - left - right) * b / max_bits;
    let y = |k: f64| top + (h - top - bottom) * (hi - k.log10()) / (hi - lo);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>
<text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes and grid: a line per decade of KLD, per bit.
    for e in lo as i32..=hi as i32 {
        let yy = y(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">1e{e}</text>"##,
            w - right,
            left - 6.0,
            yy + 4.0
        );
    }
    for b in 0..=max_bits as i32 {
        let xx = x(b as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{b}</text>"##,
            h - bottom,
            h - bottom + 16.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">bits per element (metadata included)</text>
<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">mean KL divergence vs fp16 cache (log)</text>"##,
        w - left - right,
        h - top - bottom,
        (left + w - right) / 2.0,
        h - 18.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let front = pareto_front(&pts);
    let line: Vec<String> = front
        .iter()
        .map(|&i| format!("{:.1},{:.1}", x(pts[i].bits), y(pts[i].kld)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="5,3"/>"##,
        line.join(" ")
    );
    // Labels go right of their point, moved down past any label already placed there (with a
    // leader line back to the point).
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    for (i, p) in pts.iter().enumerate() {
        let on = front.contains(&i);
        let (cx, cy) = (x(p.bits), y(p.kld));
        let fill = if on { "#c0392b" } else { "#2c3e50" };
        let width = 6.5 * p.label.chars().count() as f64;
        // Right of the point, or left of it where the label would leave the chart.
        let lx = if cx + 6.0 + width > w {
            cx - 6.0 - width
        } else {
            cx + 6.0
        };
        let mut ly = cy - 5.0;
        while placed
            .iter()
            .any(|&(px, py, pw)| lx < px + pw && px < lx + width && (ly - py).abs() < 12.0)
        {
            ly += 12.0;
        }
        placed.push((lx, ly, width));
        if ly - (cy - 5.0) > 6.0 {
            // A label pushed away from its point gets a thin leader line back to it.
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{fill}" stroke-width="0.6" opacity="0.6"/>"#,
                cx + 3.0,
                cy + 3.0,
                lx - 1.0,
                ly - 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{fill}"><title>{} {:.3} bits, mean KLD {:.5}</title></circle><text x="{lx:.1}" y="{ly:.1}" fill="{fill}">{}</text>"#,
            escape(&p.label),
            p.bits,
            p.kld,
            escape(&p.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c0392b">red, dashed: Pareto front</text>
</svg>"##,
        w - right - 6.0,
        top + 16.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(label: &str, bits: f64, kld: f64) -> Point {
        Point {
            label: label.into(),
            bits,
            kld,
        }
    }

    #[test]
    fn pareto_front_keeps_only_undominated_points() {
        let pts = [
            p("a", 8.5, 0.001),
            p("b", 4.5, 0.15),
            p("c", 4.5, 0.06),
            p("d", 3.375, 0.25),
            p("e", 3.375, 0.30),
            p("f", 16.0, 0.001),
        ];
        assert_eq!(pareto_front(&pts), vec![3, 2, 0]);
    }

    #[test]
    fn render_escapes_labels_and_skips_zero_kld() {
        let svg = render(
            "t<1>",
            &[p("k:int4r+v:lm3 & co", 3.9, 0.05), p("ref", 16.0, 0.0)],
        );
        assert!(svg.contains("k:int4r+v:lm3 &amp; co"));
        assert!(svg.contains("t&lt;1&gt;"));
        assert!(!svg.contains(">ref<"));
    }
}
