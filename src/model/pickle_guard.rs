//! A check of a PyTorch zip archive before candle's pickle reader sees it: what reading it would
//! allocate, bounded by the file's own size.
//!
//! candle's reader (`candle_core::pickle`) runs no Python code, but it copies a memoised object
//! on every memo reference (BINGET) and every memo store (BINPUT), and allocates a string's or a
//! tensor's declared length before reading it. So 208 bytes of nested memo references ask for
//! billions of objects, and a tensor declared with 10^12 elements asks for terabytes, whatever
//! the archive holds. This module replays the pickle with sizes instead of objects, following the
//! opcodes candle reads, and refuses an archive that would build more than a small multiple of
//! its own size, or whose tensors claim more elements than their storage files hold. Patching the
//! reader (reference-counted memo entries) was the rejected alternative: it is candle's code, and
//! the declared-shape allocation would remain.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The largest `data.pkl` read: a BERT state dict's pickle is tens of kilobytes.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Objects (counted as one unit each, plus one per byte of text) the replay may build per byte
/// of pickle, beyond a fixed allowance. A real state dict builds each object once, plus small
/// copies of memoised class references: a few units per byte.
const UNITS_PER_BYTE: u64 = 64;
const BASE_UNITS: u64 = 1 << 20;

/// Why an archive is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its pickle `{entry}` is {size} bytes, above the {MAX_PICKLE_BYTES} read")]
    PickleTooLarge { entry: String, size: u64 },
    #[error(
        "its pickle `{entry}` would build over {budget} objects from {size} bytes (repeated memo references)"
    )]
    PickleExpands {
        entry: String,
        size: u64,
        budget: u64,
    },
    #[error("its pickle `{entry}` declares a string of {length} bytes past its end")]
    StringPastEnd { entry: String, length: u64 },
    #[error("tensor `{name}` needs {needed} bytes but its storage `{storage}` holds {held}")]
    TensorPastStorage {
        name: String,
        storage: String,
        needed: u64,
        held: u64,
    },
    #[error("cannot read the archive: {0}")]
    Archive(String),
}

/// The uncompressed size of every entry of a checked archive, by name, for [`check_tensor`].
pub type EntrySizes = HashMap<String, u64>;

/// Checks every `data.pkl` of the zip archive at `path`; returns the entries' sizes.
pub fn check_archive(path: &Path) -> Result<EntrySizes, Refusal> {
    let archive = |e: &dyn std::fmt::Display| Refusal::Archive(e.to_string());
    let file = fs_err::File::open(path).map_err(|e| archive(&e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| archive(&e))?;
    let mut sizes = EntrySizes::new();
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| archive(&e))?;
        let name = entry.name().to_owned();
        let size = entry.size();
        sizes.insert(name.clone(), size);
        if !name.ends_with("data.pkl") {
            continue;
        }
        if size > MAX_PICKLE_BYTES {
            return Err(Refusal::PickleTooLarge { entry: name, size });
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| archive(&e))?;
        replay(&bytes).map_err(|problem| match problem {
            Problem::Expands(budget) => Refusal::PickleExpands {
                entry: name.clone(),
                size: bytes.len() as u64,
                budget,
            },
            Problem::StringPastEnd(length) => Refusal::StringPastEnd {
                entry: name.clone(),
                length,
            },
        })?;
    }
    Ok(sizes)
}

/// Checks that the tensor `name`, of `elements` elements of `dtype_bytes` each starting at
/// element `offset` of the storage entry `storage` (a path inside the archive, as candle names
/// it), fits in that entry.
pub fn check_tensor(
    sizes: &EntrySizes,
    name: &str,
    storage: &str,
    offset: usize,
    elements: usize,
    dtype_bytes: usize,
) -> Result<(), Refusal> {
    let held = sizes.get(storage).copied().unwrap_or(0);
    let needed = (offset as u64)
        .saturating_add(elements as u64)
        .saturating_mul(dtype_bytes as u64);
    if needed > held {
        return Err(Refusal::TensorPastStorage {
            name: name.to_owned(),
            storage: storage.to_owned(),
            needed,
            held,
        });
    }
    Ok(())
}

enum Problem {
    Expands(u64),
    StringPastEnd(u64),
}

enum Item {
    Mark,
    /// An object, as the units it holds.
    Object(u64),
}

/// Replays `pickle` with sizes: every object is its units, a memo reference pushes a copy of the
/// memoised units (as candle clones it), and the units built in all are counted. An opcode
/// candle does not know ends the replay: candle refuses the file itself.
fn replay(pickle: &[u8]) -> Result<(), Problem> {
    let budget = BASE_UNITS.saturating_add(UNITS_PER_BYTE.saturating_mul(pickle.len() as u64));
    let mut built: u64 = 0;
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, u64> = HashMap::new();
    let mut at = 0usize;
    let take = |n: usize, at: &mut usize| -> Option<&[u8]> {
        let bytes = pickle.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(bytes)
    };
    let push = |stack: &mut Vec<Item>, units: u64, built: &mut u64| -> Result<(), Problem> {
        *built = built.saturating_add(units);
        if *built > budget {
            return Err(Problem::Expands(budget));
        }
        stack.push(Item::Object(units));
        Ok(())
    };
    let pop = |stack: &mut Vec<Item>| match stack.pop() {
        Some(Item::Object(units)) => Some(units),
        _ => None,
    };
    let to_mark = |stack: &mut Vec<Item>| -> Option<u64> {
        let mark = stack.iter().rposition(|item| matches!(item, Item::Mark))?;
        let units = stack[mark + 1..]
            .iter()
            .map(|item| match item {
                Item::Object(units) => *units,
                Item::Mark => 0,
            })
            .fold(0u64, u64::saturating_add);
        stack.truncate(mark);
        Some(units)
    };
    let grow_last = |stack: &mut Vec<Item>, units: u64| -> Option<()> {
        match stack.last_mut()? {
            Item::Object(last) => *last = last.saturating_add(units),
            Item::Mark => return None,
        }
        Some(())
    };
    let little = |bytes: &[u8]| {
        bytes
            .iter()
            .rev()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    };
    while let Some(&[op]) = take(1, &mut at) {
        // `None` from a step: malformed for candle too, which reports it; stop checking.
        let step: Option<Result<(), Problem>> = (|| {
            Some(match op {
                0x80 => take(1, &mut at).map(|_| ()).map(Ok)?,
                b'c' => {
                    let mut units = 1;
                    for _ in 0..2 {
                        let line = pickle.get(at..)?;
                        let end = line.iter().position(|&b| b == b'\n')?;
                        at += end + 1;
                        units += end as u64;
                    }
                    push(&mut stack, units, &mut built)
                }
                b'K' | b'M' | b'J' | b'G' | 0x8a => {
                    let n = match op {
                        b'K' => 1,
                        b'M' => 2,
                        b'J' => 4,
                        b'G' => 8,
                        _ => usize::from(*take(1, &mut at)?.first()?),
                    };
                    take(n, &mut at)?;
                    push(&mut stack, 1, &mut built)
                }
                b'X' => {
                    let length = little(take(4, &mut at)?);
                    if length > (pickle.len() - at) as u64 {
                        return Some(Err(Problem::StringPastEnd(length)));
                    }
                    take(length as usize, &mut at)?;
                    push(&mut stack, 1 + length, &mut built)
                }
                b'Q' => {
                    let units = pop(&mut stack)?;
                    push(&mut stack, units + 1, &mut built)
                }
                b't' | b'd' => {
                    let units = to_mark(&mut stack)?;
                    push(&mut stack, units.saturating_add(1), &mut built)
                }
                0x85..=0x87 => {
                    let mut units: u64 = 1;
                    for _ in 0..(op - 0x84) {
                        units = units.saturating_add(pop(&mut stack)?);
                    }
                    push(&mut stack, units, &mut built)
                }
                0x88 | 0x89 | b'N' | b'}' | b')' | b']' => push(&mut stack, 1, &mut built),
                b'a' => {
                    let units = pop(&mut stack)?;
                    grow_last(&mut stack, units).map(Ok)?
                }
                b'e' | b'u' => {
                    let units = to_mark(&mut stack)?;
                    grow_last(&mut stack, units).map(Ok)?
                }
                b's' => {
                    let units = pop(&mut stack)?.saturating_add(pop(&mut stack)?);
                    grow_last(&mut stack, units).map(Ok)?
                }
                b'.' => return None,
                b'b' | b'R' | 0x81 => {
                    let units = pop(&mut stack)?.saturating_add(pop(&mut stack)?);
                    push(&mut stack, units.saturating_add(1), &mut built)
                }
                b'(' => {
                    stack.push(Item::Mark);
                    Ok(())
                }
                b'h' | b'j' => {
                    let id = little(take(if op == b'h' { 1 } else { 4 }, &mut at)?) as u32;
                    let units = *memo.get(&id)?;
                    push(&mut stack, units, &mut built)
                }
                b'q' | b'r' => {
                    let id = little(take(if op == b'q' { 1 } else { 4 }, &mut at)?) as u32;
                    let Some(Item::Object(units)) = stack.last() else {
                        return None;
                    };
                    let units = *units;
                    // The store is a copy too.
                    built = built.saturating_add(units);
                    if built > budget {
                        return Some(Err(Problem::Expands(budget)));
                    }
                    memo.insert(id, units);
                    Ok(())
                }
                _ => return None,
            })
        })();
        match step {
            Some(Ok(())) => {}
            Some(Err(problem)) => return Err(problem),
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pickle whose memo entry 0 is replaced `rounds` times by a tuple of ten copies of itself:
    /// 10^rounds objects for candle, in 24 bytes a round.
    pub(crate) fn memo_bomb(rounds: usize) -> Vec<u8> {
        let mut pickle = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..rounds {
            pickle.push(b'(');
            for _ in 0..10 {
                pickle.extend_from_slice(&[b'h', 0]);
            }
            pickle.extend_from_slice(&[b't', b'q', 0]);
        }
        pickle.push(b'.');
        pickle
    }

    #[test]
    fn ordinary_pickles_pass_and_memo_bombs_do_not() {
        assert!(replay(&memo_bomb(2)).is_ok());
        assert!(matches!(replay(&memo_bomb(9)), Err(Problem::Expands(_))));
        // A string longer than what follows it.
        let string = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a', b'.'];
        assert!(matches!(replay(&string), Err(Problem::StringPastEnd(_))));
    }

    #[test]
    fn tensors_must_fit_their_storage() {
        let sizes: EntrySizes = [("archive/data/0".to_owned(), 64)].into();
        assert!(check_tensor(&sizes, "w", "archive/data/0", 0, 16, 4).is_ok());
        assert!(check_tensor(&sizes, "w", "archive/data/0", 1, 16, 4).is_err());
        assert!(check_tensor(&sizes, "w", "archive/data/0", 0, usize::MAX, 4).is_err());
        assert!(check_tensor(&sizes, "w", "archive/data/missing", 0, 1, 4).is_err());
    }
}
