//! Size bounds every family's config is held to, and the memory check made before a model's
//! parameters are allocated.
//!
//! The bounds keep every size product far inside `usize` and the parameter table small, so a
//! hostile `config.json` is refused before anything is allocated. [`check_params`] then refuses
//! a model whose f32 state cannot fit the machine: on Linux the memory available to this
//! process (`MemAvailable` of `/proc/meminfo`, lowered to the cgroup v2 `memory.max` when one is
//! set); elsewhere only the fixed bound [`MAX_PARAMS`] applies.

use crate::ModelError;

/// Rows of a word-embedding table.
pub const MAX_VOCAB: usize = 1 << 24;
/// Positions of a position table.
pub const MAX_POSITIONS: usize = 1 << 20;
/// Model width.
pub const MAX_WIDTH: usize = 1 << 16;
/// Transformer layers.
pub const MAX_LAYERS: usize = 1 << 12;
/// Attention heads.
pub const MAX_HEADS: usize = 1 << 16;
/// MLP width.
pub const MAX_INNER: usize = 1 << 18;
/// Rows of a token-type table.
pub const MAX_TYPE_VOCAB: usize = 1 << 16;
/// Parameters of one model (2^36: 68.7 billion, 275 GB of f32 weights).
pub const MAX_PARAMS: u128 = 1 << 36;

/// `name` (`value`) must be between 1 and `max`.
pub(crate) fn check_size(name: &str, value: usize, max: usize) -> Result<(), ModelError> {
    if value == 0 {
        return Err(ModelError::Config(format!("{name} must be positive")));
    }
    if value > max {
        return Err(ModelError::Config(format!("{name} {value} is too large: allowed 1 to {max}")));
    }
    Ok(())
}

/// What a process keeps in memory per parameter, at the least.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Footprint {
    /// Evaluation and generation: f32 weights and gradients.
    Inference,
    /// Training: f32 weights, gradients and AdamW's two moments.
    Training,
}

impl Footprint {
    /// Bytes per parameter.
    pub fn bytes_per_param(self) -> u64 {
        match self {
            Footprint::Inference => 8,
            Footprint::Training => 16,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Footprint::Inference => "f32 weights and gradients",
            Footprint::Training => "f32 weights, gradients and AdamW's two moments",
        }
    }
}

/// Memory of the machine, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    /// Installed (`MemTotal`, or the cgroup limit when lower).
    pub total: u64,
    /// Available to a new allocation without swapping (`MemAvailable`, within the cgroup's limit).
    pub available: u64,
}

/// The machine's memory, where the platform tells it (Linux); `None` elsewhere.
pub fn host_memory() -> Option<HostMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut mem = parse_meminfo(&meminfo)?;
    if let Some((limit, used)) = cgroup_limit() {
        mem.total = mem.total.min(limit);
        mem.available = mem.available.min(limit.saturating_sub(used));
    }
    Some(mem)
}

/// `MemTotal` and `MemAvailable` (kB in the file) in bytes; `MemFree` when a kernel older than
/// 3.14 has no `MemAvailable`.
fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split(':').next() == Some(name))?;
        let kb: u64 = line.split(':').nth(1)?.trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable").or_else(|| field("MemFree"))?;
    Some(HostMemory { total, available })
}

/// `(memory.max, memory.current)` of this process's cgroup (v2), when a limit is set.
fn cgroup_limit() -> Option<(u64, u64)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    Some((read("memory.max")?, read("memory.current").unwrap_or(0))) // "max" (no limit) does not parse
}

fn gb(bytes: f64) -> String {
    format!("{:.1} GB", bytes / 1e9)
}

/// Refuses a model of `n_params` parameters above [`MAX_PARAMS`], or whose `footprint` exceeds
/// the memory available on this machine ([`host_memory`]); the message gives the sizes.
pub fn check_params(n_params: usize, footprint: Footprint) -> Result<(), ModelError> {
    check_params_against(n_params, footprint, host_memory())
}

fn check_params_against(n_params: usize, footprint: Footprint, memory: Option<HostMemory>) -> Result<(), ModelError> {
    let n = n_params as u128;
    if n > MAX_PARAMS {
        return Err(ModelError::Config(format!(
            "the model would have {n} parameters ({} of f32 weights); at most {MAX_PARAMS} are allowed",
            gb(n as f64 * 4.0)
        )));
    }
    let need = n * footprint.bytes_per_param() as u128;
    match memory {
        Some(m) if need > m.available as u128 => Err(ModelError::Memory(format!(
            "the model has {n_params} parameters and needs at least {} ({} bytes per parameter: {}), but this machine has {} available (of {}); use a smaller model or free memory",
            gb(need as f64),
            footprint.bytes_per_param(),
            footprint.what(),
            gb(m.available as f64),
            gb(m.total as f64)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(HostMemory { total: 16318412 * 1024, available: 12000000 * 1024 }));
        let old = "MemTotal:       2000 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo(old), Some(HostMemory { total: 2000 * 1024, available: 1000 * 1024 }));
        assert_eq!(parse_meminfo("garbage"), None);
    }

    #[test]
    fn a_model_beyond_the_available_memory_is_refused_with_its_size() {
        let mem = Some(HostMemory { total: 16_000_000_000, available: 10_000_000_000 });
        // 625M parameters: 10 GB to train, 5 GB to evaluate.
        assert!(check_params_against(625_000_000, Footprint::Training, mem).is_ok());
        let e = check_params_against(625_000_001, Footprint::Training, mem).unwrap_err().to_string();
        assert_eq!(
            e,
            "the model has 625000001 parameters and needs at least 10.0 GB (16 bytes per parameter: f32 weights, gradients and AdamW's two moments), but this machine has 10.0 GB available (of 16.0 GB); use a smaller model or free memory"
        );
        assert!(check_params_against(1_250_000_000, Footprint::Inference, mem).is_ok());
        assert!(check_params_against(1_250_000_001, Footprint::Inference, mem).is_err());
        // no memory figure: only the fixed bound
        assert!(check_params_against(1 << 36, Footprint::Training, None).is_ok());
        let e = check_params_against((1 << 36) + 1, Footprint::Training, None).unwrap_err().to_string();
        assert!(e.contains("at most 68719476736 are allowed"), "{e}");
    }
}
