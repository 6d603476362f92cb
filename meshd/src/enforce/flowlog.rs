//! The flow log: every new flow (allowed, denied or audited) and every end of a flow, as JSON
//! lines in a file and in a bounded in-memory ring that `meshctl flows` reads.
//!
//! The data threads only hand a small event to a bounded channel (dropped and counted when the
//! logger falls behind); names, labels and JSON are made on the logger's own thread.

use super::{Decision, Rules, EXTERNAL};
use parking_lot::Mutex;
use policy::conntrack::{ConnKey, Entry};
use policy::engine::{Compiled, Direction};
use proto::admin::{FlowEnd, FlowRecord, StagedVerdict};
use proto::ip::FlowKey;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Events waiting for the logger.
const BACKLOG: usize = 8192;
/// Records kept in memory for `meshctl flows`.
const RING: usize = 10_000;
/// A denied flow is logged once per this interval however often its packets are retried.
const DENIED_REPEAT_MS: u64 = 10_000;
/// The log file is renamed to `FILE.1` when it reaches this size (`FILE.1` to `FILE.2`, and so on).
const ROTATE_BYTES: u64 = 64 << 20;
/// Rotated files kept (`FILE.1` to `FILE.4`): with the live one, at most 320 MiB of history.
pub const KEEP_ROTATED: usize = 4;
/// Bytes read from the end of each file at start, for the history `meshctl flows` shows.
const HISTORY_TAIL_BYTES: u64 = 16 << 20;
/// Open flows remembered for their closing record; beyond this the oldest are forgotten.
const MAX_OPEN: usize = 1 << 20;
/// (direction, policy, action) counters kept; policies of sets replaced long ago beyond this are
/// counted under the policy name `other`.
const MAX_VERDICT_KEYS: usize = 4096;

/// Decisions on new flows by (direction, deciding policy, action).
pub type VerdictCounts = std::collections::BTreeMap<(&'static str, String, &'static str), u64>;

pub enum FlowEvent {
    /// A new flow; `limited`: allowed, but over its rule's rate limit, so dropped.
    New {
        flow: FlowKey,
        decision: Decision,
        rules: Arc<Rules>,
        limited: bool,
    },
    /// A packet of a tracked flow over its rule's rate limit (at most once per meter per
    /// [`policy::ratelimit::meters::LOG_EVERY_MS`]).
    Limited {
        flow: FlowKey,
        decision: Decision,
        rules: Arc<Rules>,
    },
    Closed {
        key: ConnKey,
        entry: Entry,
        cut: bool,
    },
}

#[derive(Clone)]
pub struct FlowLog {
    tx: SyncSender<FlowEvent>,
    ring: Arc<Mutex<Ring>>,
    pub lost: Arc<AtomicU64>,
    pub verdicts: Arc<Mutex<VerdictCounts>>,
}

#[derive(Default)]
struct Ring {
    records: VecDeque<FlowRecord>,
    next_seq: u64,
}

impl FlowLog {
    /// Starts the logger thread, writing to `file` if given.
    pub fn start(file: Option<PathBuf>) -> std::io::Result<FlowLog> {
        let (tx, rx) = sync_channel(BACKLOG);
        // The history an earlier run wrote, so that `meshctl flows` (and the mesh) still see it,
        // and sequence numbers go on from where they were: a cursor stays valid over a restart.
        let records = file.as_deref().map(history).unwrap_or_default();
        let next_seq = records.back().map_or(1, |r| r.seq + 1);
        let ring = Arc::new(Mutex::new(Ring { records, next_seq }));
        let log = FlowLog {
            tx,
            ring: ring.clone(),
            lost: Arc::default(),
            verdicts: Arc::default(),
        };
        let verdicts = log.verdicts.clone();
        let writer = match file {
            Some(path) => Some(LogFile::open(path)?),
            None => None,
        };
        std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || run(rx, ring, verdicts, writer))?;
        Ok(log)
    }

    pub fn send(&self, e: FlowEvent) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(e) {
            self.lost.fetch_add(1, Relaxed);
        }
    }

    /// Records after `after` whose time is `since` (RFC 3339, as the records write it) or later,
    /// oldest first, at most `limit`; and the sequence to ask from next.
    pub fn query_since(
        &self,
        after: u64,
        since: &str,
        denied_only: bool,
        limit: usize,
    ) -> (Vec<FlowRecord>, u64) {
        if limit == 0 {
            return (Vec::new(), after);
        }
        let ring = self.ring.lock();
        let records: Vec<FlowRecord> = ring
            .records
            .iter()
            .filter(|r| r.seq > after && r.time.as_str() >= since)
            .filter(|r| !denied_only || r.verdict != "allow")
            .take(limit)
            .cloned()
            .collect();
        let next = match records.last() {
            Some(r) if records.len() == limit => r.seq,
            _ => ring.records.back().map_or(after, |r| r.seq),
        };
        (records, next.max(after))
    }

    /// Records after `since`, oldest first, at most `limit`; and the sequence to ask from next.
    /// `staged_denied`: only new flows the staged policies would deny.
    pub fn query(
        &self,
        since: u64,
        denied_only: bool,
        staged_denied: bool,
        limit: usize,
    ) -> (Vec<FlowRecord>, u64) {
        let ring = self.ring.lock();
        let records: Vec<FlowRecord> = ring
            .records
            .iter()
            .filter(|r| r.seq > since)
            .filter(|r| !denied_only || r.verdict != "allow")
            .filter(|r| !staged_denied || r.staged.as_ref().is_some_and(|s| s.verdict == "deny"))
            .take(limit)
            .cloned()
            .collect();
        let next = match records.last() {
            Some(r) if records.len() == limit => r.seq,
            _ => ring.records.back().map_or(since, |r| r.seq),
        };
        (records, next.max(since))
    }
}

struct LogFile {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    size: u64,
}

impl LogFile {
    /// Opens (or creates) the log, readable by its owner alone: it names every identity and
    /// flow of this node. A file left readable by an older version is restricted too.
    fn open(path: PathBuf) -> std::io::Result<LogFile> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path,
            file: std::io::BufWriter::new(file),
            size,
        })
    }

    fn write(&mut self, line: &str) {
        if self.size > ROTATE_BYTES {
            let _ = self.file.flush();
            for n in (1..KEEP_ROTATED).rev() {
                let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
            }
            let _ = std::fs::rename(&self.path, rotated(&self.path, 1));
            match LogFile::open(self.path.clone()) {
                Ok(f) => *self = f,
                Err(e) => tracing::warn!(error = %e, "reopening the flow log"),
            }
        }
        if writeln!(self.file, "{line}").is_ok() {
            self.size += line.len() as u64 + 1;
        }
    }
}

/// `FILE.n`.
fn rotated(path: &std::path::Path, n: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The newest [`RING`] records of the log at `path` and its rotated files, oldest first. Only
/// the last [`HISTORY_TAIL_BYTES`] of each file are read; a line that is not a record (torn by a
/// crash, or edited) is skipped; records must go forward in sequence, so a file from another
/// life of the log cannot slip in among them.
fn history(path: &std::path::Path) -> VecDeque<FlowRecord> {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let mut out: VecDeque<FlowRecord> = VecDeque::new();
    let files =
        std::iter::once(path.to_path_buf()).chain((1..=KEEP_ROTATED).map(|n| rotated(path, n)));
    for file in files {
        if out.len() >= RING {
            break;
        }
        // A live file missing (moved away by hand, or a crash between rotating and reopening)
        // leaves the rotated ones to read: numbering must not start again at 1.
        let Ok(mut f) = std::fs::File::open(&file) else {
            continue;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(HISTORY_TAIL_BYTES);
        if f.seek(SeekFrom::Start(start)).is_err() {
            break;
        }
        let mut lines = std::io::BufReader::new(f.take(HISTORY_TAIL_BYTES)).lines();
        if start > 0 {
            lines.next(); // a line cut by where the read began
        }
        let mut these: Vec<FlowRecord> = lines
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<FlowRecord>(&l).ok())
            .collect();
        these.retain(|r| out.front().is_none_or(|first| r.seq < first.seq));
        for r in these.into_iter().rev() {
            if out.len() >= RING {
                break;
            }
            out.push_front(r);
        }
    }
    // In order of sequence, each once.
    let mut last = 0;
    out.retain(|r| {
        let keep = r.seq > last;
        last = last.max(r.seq);
        keep
    });
    out
}

fn run(
    rx: Receiver<FlowEvent>,
    ring: Arc<Mutex<Ring>>,
    verdicts: Arc<Mutex<VerdictCounts>>,
    mut file: Option<LogFile>,
) {
    let mut open: HashMap<ConnKey, FlowRecord> = HashMap::new();
    let mut denied: HashMap<ConnKey, u64> = HashMap::new();
    let epoch = std::time::Instant::now();
    let mut written: Vec<FlowRecord> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(BACKLOG));
        for e in batch {
            let now_ms = epoch.elapsed().as_millis() as u64;
            if let FlowEvent::New {
                decision,
                rules,
                limited,
                ..
            } = &e
            {
                count_verdict(&mut verdicts.lock(), decision, rules, *limited);
            }
            let Some(mut rec) = record(e, &mut open, &mut denied, now_ms) else {
                continue;
            };
            // Only this thread adds records, so numbering first and storing after the file
            // write keeps the order, and `meshctl flows` never waits on the disk.
            rec.seq = {
                let mut r = ring.lock();
                r.next_seq += 1;
                r.next_seq - 1
            };
            if let Some(f) = &mut file {
                if let Ok(line) = serde_json::to_string(&rec) {
                    f.write(&line);
                }
            }
            written.push(rec);
        }
        // A record is shown (and its number handed out as a cursor) only once it is on disk: a
        // crash cannot give its number to another record after the restart.
        if let Some(f) = &mut file {
            let _ = f.file.flush();
        }
        let mut r = ring.lock();
        for rec in written.drain(..) {
            if r.records.len() >= RING {
                r.records.pop_front();
            }
            r.records.push_back(rec);
        }
    }
}

fn count_verdict(counts: &mut VerdictCounts, d: &Decision, rules: &Rules, limited: bool) {
    let direction = match d.direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    };
    let action = if limited { RATE_LIMITED } else { action(d) };
    let mut policy = rules.compiled.policy_name(&d.verdict).to_string();
    if counts.len() >= MAX_VERDICT_KEYS
        && !counts.contains_key(&(direction, policy.clone(), action))
    {
        policy = "other".into();
    }
    *counts.entry((direction, policy, action)).or_default() += 1;
}

/// The verdict of a flow allowed by a rule whose rate limit it exceeded.
pub const RATE_LIMITED: &str = "rate-limited";

fn action(d: &Decision) -> &'static str {
    if d.verdict.allow {
        "allow"
    } else if d.audited {
        "audit"
    } else {
        "deny"
    }
}

fn record(
    e: FlowEvent,
    open: &mut HashMap<ConnKey, FlowRecord>,
    denied: &mut HashMap<ConnKey, u64>,
    now_ms: u64,
) -> Option<FlowRecord> {
    match e {
        FlowEvent::Limited {
            flow,
            decision,
            rules,
        } => {
            let mut rec = new_record(&flow, &decision, &rules);
            rec.event = "limited".into();
            rec.verdict = RATE_LIMITED.into();
            rec.staged = None;
            Some(rec)
        }
        FlowEvent::New {
            flow,
            decision,
            rules,
            limited,
        } => {
            let Decision {
                verdict, audited, ..
            } = decision;
            let key = ConnKey::of(&flow);
            let passed = (verdict.allow || audited) && !limited;
            if !passed {
                if denied
                    .get(&key)
                    .is_some_and(|t| now_ms < t + DENIED_REPEAT_MS)
                {
                    return None;
                }
                if denied.len() >= MAX_OPEN {
                    denied.clear();
                }
                denied.insert(key, now_ms);
            }
            let mut rec = new_record(&flow, &decision, &rules);
            if limited {
                rec.verdict = RATE_LIMITED.into();
            }
            if passed {
                if open.len() >= MAX_OPEN {
                    open.clear();
                }
                open.insert(key, rec.clone());
            }
            Some(rec)
        }
        FlowEvent::Closed { key, entry, cut } => {
            let mut rec = open.remove(&key)?;
            rec.time = now();
            rec.event = if cut { "cut" } else { "closed" }.into();
            rec.packets = Some(entry.packets);
            rec.bytes = Some(entry.bytes);
            Some(rec)
        }
    }
}

/// The record of a new flow decided as `decision`.
fn new_record(flow: &FlowKey, decision: &Decision, rules: &Rules) -> FlowRecord {
    let Decision {
        verdict,
        direction,
        src: src_id,
        dst: dst_id,
        ..
    } = *decision;
    FlowRecord {
        seq: 0,
        time: now(),
        event: "new".into(),
        direction: match direction {
            Direction::Egress => "egress".into(),
            Direction::Ingress => "ingress".into(),
        },
        verdict: action(decision).into(),
        protocol: protocol_name(flow.protocol),
        src: end(rules, src_id, flow.src, flow.src_port, flow),
        dst: end(rules, dst_id, flow.dst, flow.dst_port, flow),
        policy: rules.compiled.policy_name(&verdict).to_string(),
        rule: Compiled::rule_name(direction, &verdict),
        log_rule: verdict.logged,
        packets: None,
        bytes: None,
        staged: rules.staged_verdict(flow, decision).map(|v| StagedVerdict {
            verdict: if v.allow { "allow" } else { "deny" }.into(),
            policy: rules
                .staged
                .as_ref()
                .map_or("", |c| c.policy_name(&v))
                .to_string(),
            rule: Compiled::rule_name(direction, &v),
        }),
        node: None,
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn end(rules: &Rules, id: u32, ip: std::net::IpAddr, port: u16, flow: &FlowKey) -> FlowEnd {
    let who = rules.identity(id);
    let has_ports = super::policy_flow(flow).src_port.is_some();
    FlowEnd {
        ip: ip.to_string(),
        port: has_ports.then_some(port),
        trust_domain: who.map(|i| i.endpoint.trust_domain.clone()),
        namespace: who.map(|i| i.endpoint.namespace.clone()),
        name: who.map(|i| i.endpoint.name.clone()),
        spiffe_id: who.map(|i| i.endpoint.spiffe_id()),
        networks: if id == EXTERNAL {
            rules
                .compiled
                .networks_at(ip)
                .into_iter()
                .map(str::to_string)
                .collect()
        } else {
            Vec::new()
        },
        labels: who.map(|i| i.endpoint.labels.clone()).unwrap_or_default(),
    }
}

/// The flow log's protocol names: the policy language's, in lower case (`tcp`, `icmpv6`).
pub fn protocol_name(p: u8) -> String {
    policy::testing::protocol_name(p).to_ascii_lowercase()
}

/// How often idle flows are looked for (and closing records written).
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> FlowRecord {
        let end = FlowEnd {
            ip: "100.64.0.1".into(),
            port: None,
            trust_domain: None,
            namespace: None,
            name: None,
            spiffe_id: None,
            networks: Vec::new(),
            labels: Default::default(),
        };
        FlowRecord {
            seq,
            time: format!("2026-11-24T10:00:00.{seq:03}Z"),
            event: "new".into(),
            direction: "ingress".into(),
            verdict: "deny".into(),
            protocol: "icmp".into(),
            src: end.clone(),
            dst: end,
            policy: "default-deny".into(),
            rule: None,
            log_rule: false,
            packets: None,
            bytes: None,
            staged: None,
            node: None,
        }
    }

    fn lines(seqs: impl Iterator<Item = u64>) -> String {
        seqs.map(|s| serde_json::to_string(&record(s)).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn the_history_of_an_earlier_run_is_read_back_in_order_and_numbering_goes_on() {
        let dir = std::env::temp_dir().join(format!("meshd-flowlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        // Two rotated files and the live one, a torn last line (a crash mid-write), and an
        // older file of another life of the log whose numbers do not come before ours.
        std::fs::write(rotated(&path, 3), lines(500..510)).unwrap();
        std::fs::write(rotated(&path, 2), lines(1..4)).unwrap();
        std::fs::write(rotated(&path, 1), lines(4..8)).unwrap();
        let mut live = lines(8..11);
        live.push_str("{\"seq\": 11, \"ti");
        std::fs::write(&path, live).unwrap();
        let log = FlowLog::start(Some(path.clone())).unwrap();
        let (records, next) = log.query(0, false, false, 100);
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..11).collect::<Vec<_>>());
        assert_eq!(next, 10);
        assert_eq!(log.ring.lock().next_seq, 11);
        // A cursor from before the restart still means the same records.
        let (after, _) = log.query(8, false, false, 100);
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), [9, 10]);
        // The live file gone (moved away, or a crash between rotating and reopening): the
        // rotated ones still number the log on.
        std::fs::remove_file(&path).unwrap();
        let log = FlowLog::start(Some(path.clone())).unwrap();
        assert_eq!(log.ring.lock().next_seq, 8);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = std::env::temp_dir().join(format!("meshd-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let mut f = LogFile::open(path.clone()).unwrap();
        for i in 0..(KEEP_ROTATED + 3) {
            f.size = ROTATE_BYTES + 1;
            f.write(&format!("line {i}"));
        }
        let _ = f.file.flush();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec!["flows.jsonl".to_string()];
        want.extend((1..=KEEP_ROTATED).map(|n| format!("flows.jsonl.{n}")));
        assert_eq!(names, want);
        // The newest rotated file holds the line before the live one's.
        let live = std::fs::read_to_string(&path).unwrap();
        let one = std::fs::read_to_string(rotated(&path, 1)).unwrap();
        assert_eq!((live.trim(), one.trim()), ("line 6", "line 5"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
