//! The usage chart's geometry, rendered as SVG by `templates/console/usage.html`: one step
//! line per component, the highest number of licenses in use in each bucket.

use crate::history::ComponentSeries;
use crate::state::timestamp;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

pub struct Series {
    pub component: String,
    pub color: &'static str,
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
    pub fn build(data: &[ComponentSeries], from_ms: i64, bucket_ms: i64, bucket: &str) -> Chart {
        let (width, height, left, right, top, bottom) =
            (860i64, 300i64, 50i64, 840i64, 30i64, 270i64);
        let buckets = data.first().map(|s| s.peaks.len()).unwrap_or(1).max(1) as i64;
        let max = data
            .iter()
            .flat_map(|s| s.peaks.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1);
        let x = |index: i64| left + (right - left) * index / buckets;
        let y = |value: i64| bottom - (bottom - top) * value / max;
        let series = data
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let mut points = String::new();
                for (bucket, value) in s.peaks.iter().enumerate() {
                    let bucket = bucket as i64;
                    points.push_str(&format!(
                        "{},{} {},{} ",
                        x(bucket),
                        y(*value),
                        x(bucket + 1),
                        y(*value)
                    ));
                }
                Series {
                    component: s.component.clone(),
                    color: COLORS[index % COLORS.len()],
                    points: points.trim_end().to_string(),
                    peak: s.peaks.iter().copied().max().unwrap_or(0),
                    denials: s.denials.iter().sum(),
                    legend_x: left + 120 * index as i64,
                }
            })
            .collect();
        let step = (max / 5).max(1);
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
        let x_ticks = (0..=buckets)
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
