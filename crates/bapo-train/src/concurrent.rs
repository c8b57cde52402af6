//! Independent pieces of work run a few at a time on their own threads, results in input order:
//! the batches of the reference pass and of generation, the micro-batches of a step.
//!
//! Why it pays on CPU backends: burn-flex runs element-wise ops on the calling thread and only
//! GEMMs on its rayon pool, so one pass keeps about 1.3 of 2 cores busy (`perf`: the calling
//! thread holds 54 % of a step's samples, the two pool threads 25 % and 21 %). Two passes at
//! once overlap one's element-wise work with the other's. Every piece is computed exactly as it
//! would be alone, so results do not depend on the thread count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Pieces run at once when a config does not say: 1 unless the program sets it (the binary
/// does, per backend: 2 on CPU backends, 1 on GPUs).
static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(1);

/// Sets how many independent pieces run at once when a config does not name a number
/// (process-wide, like the rayon pool the binary also sets up).
pub fn set_default_threads(n: usize) {
    DEFAULT_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The process default of [`set_default_threads`].
pub fn default_threads() -> usize {
    DEFAULT_THREADS.load(Ordering::Relaxed)
}

/// `f` applied to every item, `threads` at a time (each thread takes the next item when it is
/// free), results in `items`' order. `done(i, &result)` runs on the calling thread as each
/// finishes, for progress. `threads <= 1` runs everything on the calling thread, in order.
/// A panic in `f` is resumed on the calling thread.
pub fn map_ordered<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
    mut done: impl FnMut(usize, &R),
) -> Vec<R> {
    let threads = threads.min(items.len());
    if threads <= 1 {
        return items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let r = f(x);
                done(i, &r);
                r
            })
            .collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, R)>();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let tx = tx.clone();
                let (next, f) = (&next, &f);
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(x) = items.get(i) else { break };
                    if tx.send((i, f(x))).is_err() {
                        break;
                    }
                })
            })
            .collect();
        drop(tx);
        for (i, r) in rx {
            done(i, &r);
            out[i] = Some(r);
        }
        for h in handles {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item was computed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_input_order_and_every_item_is_done_once() {
        let items: Vec<u64> = (0..23).collect();
        for threads in [1, 2, 5, 64] {
            let mut seen = Vec::new();
            let out = map_ordered(
                &items,
                threads,
                |&x| {
                    // Uneven work, so later items can finish first.
                    std::thread::sleep(std::time::Duration::from_micros((23 - x) * 50));
                    x * x
                },
                |i, &r| seen.push((i, r)),
            );
            assert_eq!(out, items.iter().map(|x| x * x).collect::<Vec<_>>());
            seen.sort();
            assert_eq!(seen, out.iter().copied().enumerate().collect::<Vec<_>>());
        }
    }

    #[test]
    #[should_panic(expected = "item 7")]
    fn a_panic_reaches_the_caller() {
        let items: Vec<u32> = (0..10).collect();
        map_ordered(
            &items,
            3,
            |&x| {
                assert!(x != 7, "item 7");
                x
            },
            |_, _| {},
        );
    }
}
