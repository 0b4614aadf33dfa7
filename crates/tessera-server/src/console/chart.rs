//! The usage chart's geometry, rendered as SVG by `templates/console/usage.html`: one step
//! line per component, the highest number of licenses in use in each bucket; a dashed line
//! at each component's licenses now; round ticks; times in UTC. Lines of equal values stay
//! apart: each series has its own dash pattern and is drawn a pixel lower than the last.

use crate::history::ComponentSeries;
use crate::state::timestamp;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Dash patterns, so that series with the same values stay distinguishable.
const DASHES: [&str; 4] = ["none", "6 3", "2 3", "10 3 2 3"];

pub struct Series {
    pub component: String,
    pub color: &'static str,
    pub dash: &'static str,
    /// The component's licenses now (a dashed line; `None` when it has none).
    pub licenses_y: Option<i64>,
    pub licenses: u32,
    /// `x,y x,y ...`
    pub points: String,
    pub peak: i64,
    pub denials: i64,
    pub legend_x: i64,
}

pub struct Chart {
    pub width: i64,
    pub height: i64,
    pub left: i64,
    pub right: i64,
    pub top: i64,
    pub bottom: i64,
    pub series: Vec<Series>,
    /// (label, y)
    pub y_ticks: Vec<(i64, i64)>,
    /// (label, x)
    pub x_ticks: Vec<(String, i64)>,
}

impl Chart {
    /// `licenses`: each component's licenses now.
    pub fn build(
        data: &[ComponentSeries],
        licenses: &std::collections::BTreeMap<String, u32>,
        from_ms: i64,
        bucket_ms: i64,
        bucket: &str,
    ) -> Chart {
        let (width, height, left, right, top, bottom) =
            (860i64, 300i64, 50i64, 840i64, 30i64, 270i64);
        let buckets = data.first().map(|s| s.peaks.len()).unwrap_or(1).max(1) as i64;
        let highest = data
            .iter()
            .flat_map(|s| s.peaks.iter().copied())
            .chain(
                data.iter()
                    .map(|s| i64::from(licenses.get(&s.component).copied().unwrap_or(0))),
            )
            .max()
            .unwrap_or(0)
            .max(1);
        let step = round_step(highest);
        // The axis ends at the first round tick at or above the highest value.
        let max = (highest + step - 1) / step * step;
        let x = |index: i64| left + (right - left) * index / buckets;
        let y = |value: i64| bottom - (bottom - top) * value / max;
        let series = data
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let mut points = String::new();
                // Equal values of several series: each drawn a pixel below the one before.
                let nudge = index as i64 % 4;
                for (bucket, value) in s.peaks.iter().enumerate() {
                    let bucket = bucket as i64;
                    points.push_str(&format!(
                        "{},{} {},{} ",
                        x(bucket),
                        y(*value) + nudge,
                        x(bucket + 1),
                        y(*value) + nudge
                    ));
                }
                let licenses = licenses.get(&s.component).copied().unwrap_or(0);
                Series {
                    component: s.component.clone(),
                    color: COLORS[index % COLORS.len()],
                    dash: DASHES[(index / COLORS.len() + index) % DASHES.len()],
                    licenses_y: (licenses > 0).then(|| y(i64::from(licenses))),
                    licenses,
                    points: points.trim_end().to_string(),
                    peak: s.peaks.iter().copied().max().unwrap_or(0),
                    denials: s.denials.iter().sum(),
                    legend_x: left + 120 * index as i64,
                }
            })
            .collect();
        let y_ticks = (0..=max)
            .step_by(step as usize)
            .map(|value| (value, y(value)))
            .collect();
        let format = match bucket {
            "hour" => "%H:%M",
            "day" => "%m-%d",
            _ => "%Y-%m",
        };
        let every = (buckets / 6).max(1);
        // Hours on round hours of the day (00:00, 04:00, ...): the first tick is the first
        // bucket whose start is a multiple of the step.
        let first = if bucket == "hour" {
            (every - (from_ms.div_euclid(bucket_ms)).rem_euclid(every)) % every
        } else {
            0
        };
        let x_ticks = (first..=buckets)
            .step_by(every as usize)
            .map(|index| {
                let label = timestamp(from_ms + index * bucket_ms)
                    .strftime(format)
                    .to_string();
                (label, x(index))
            })
            .collect();
        Chart {
            width,
            height,
            left,
            right,
            top,
            bottom,
            series,
            y_ticks,
            x_ticks,
        }
    }
}

/// A tick step of 1, 2 or 5 times a power of ten giving at most 6 ticks above zero.
pub fn round_step(highest: i64) -> i64 {
    let mut power = 1i64;
    loop {
        for factor in [1, 2, 5] {
            let step = factor * power;
            if highest <= step * 6 {
                return step;
            }
        }
        power = power.saturating_mul(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_the_axis_ends_on_one() {
        assert_eq!(round_step(1), 1);
        assert_eq!(round_step(6), 1);
        assert_eq!(round_step(7), 2);
        assert_eq!(round_step(13), 5);
        assert_eq!(round_step(1333), 500);
        assert_eq!(round_step(5000), 1000);
        let data = vec![ComponentSeries {
            component: "cad".into(),
            peaks: vec![0, 1333, 900],
            denials: vec![0, 0, 0],
        }];
        let licenses = [("cad".to_string(), 5000u32)].into_iter().collect();
        let chart = Chart::build(&data, &licenses, 0, 3_600_000, "hour");
        let labels: Vec<i64> = chart.y_ticks.iter().map(|t| t.0).collect();
        assert_eq!(labels, [0, 1000, 2000, 3000, 4000, 5000]);
        assert_eq!(chart.series[0].licenses_y, Some(chart.top));
        // 24 hours from 07:00: ticks on multiples of four hours.
        let data = vec![ComponentSeries {
            component: "cad".into(),
            peaks: vec![1; 24],
            denials: vec![0; 24],
        }];
        let chart = Chart::build(&data, &licenses, 7 * 3_600_000, 3_600_000, "hour");
        let labels: Vec<&str> = chart.x_ticks.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(
            labels,
            ["08:00", "12:00", "16:00", "20:00", "00:00", "04:00"]
        );
    }
}
