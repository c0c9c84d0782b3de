// SPDX-License-Identifier: MPL-2.0

//! Every run (and every sustain trial) as one CSV row, for scripts/bench-plot.py.

use std::io::Write;

use crate::report::Row;

const HEADER: &str = "mode,transport,clients,size,bitrate,element,rep,status,duration_s,\
pushed_bytes,delivered_bytes,delivered_ratio,push_rate_ratio,cpu_s,cpu_user_s,cpu_sys_s,\
cpu_s_per_gb,kicked,lost,p50_ms,p99_ms,max_ms,peak_rss_mb,rss_per_client_kb,gbit_s,\
drain_cpu_s,gaps,flushed,nvcsw,setup_s,loadavg,busy_before_pct,foreign_pct,push_p99_us,push_max_us,io_threads,units_max,rs_props,stalled,\
stalled_removed,others_removed,kept,kept_exact,kept_gap_clients,kept_gaps,rate";

fn line(r: &Row) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{:.3},{},{},{:.5},{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{:.4},{:.4},{:.4},{:.2},{:.3},{:.4},{:.4},{},{},{},{:.3},{:.2},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{},{},{},{},{}",
        r.mode,
        r.transport,
        r.clients,
        r.size,
        r.bitrate,
        r.elem,
        r.rep,
        r.status,
        r.duration_s,
        r.pushed_bytes,
        r.delivered_bytes,
        r.delivered_ratio,
        r.push_rate_ratio,
        r.cpu_s,
        r.cpu_user_s,
        r.cpu_sys_s,
        r.cpu_s_per_gb,
        r.kicked,
        r.lost,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.peak_rss_mb,
        r.rss_per_client_kb,
        r.gbit_s,
        r.drain_cpu_s,
        r.gaps,
        r.flushed,
        r.nvcsw,
        r.setup_s,
        r.loadavg,
        r.busy_before_pct,
        r.foreign_pct,
        r.push_p99_us,
        r.push_max_us,
        r.io_threads,
        r.units_max,
        r.rs_props,
        r.stalled,
        r.stalled_removed,
        r.others_removed,
        r.kept,
        r.kept_exact,
        r.kept_gap_clients,
        r.kept_gaps,
        r.rate.map_or(String::new(), |r| format!("{r:.3}"))
    )
}

/// The CSV file, if one was asked for.
pub struct Csv(Option<std::fs::File>);

impl Csv {
    pub fn open(path: Option<&str>) -> Csv {
        Csv(path.map(|p| {
            let mut f =
                std::fs::File::create(p).unwrap_or_else(|e| panic!("cannot write {p}: {e}"));
            writeln!(f, "{HEADER}").unwrap();
            f
        }))
    }

    pub fn row(&mut self, r: &Row) {
        if let Some(f) = &mut self.0 {
            writeln!(f, "{}", line(r)).unwrap();
            f.flush().unwrap();
        }
    }
}
