//! The queue: which queued task starts next, on which GPUs, under the global and per-user
//! limits. Persistent (queued tasks are records in the store) and ordered by priority, then
//! age. The decision itself ([`admit`]) is a pure function of the queue and what runs.

use std::collections::HashMap;

use super::task::{Task, TaskStatus};
use crate::error::Result;
use crate::store::Store;

/// What the scheduler needs to know of a running task.
#[derive(Debug, Clone)]
pub struct RunningSlot {
    pub owner: String,
    pub gpus: Vec<u32>,
}

/// The limits the queue keeps.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Workers at once.
    pub max_concurrent: usize,
    /// Running tasks per user.
    pub max_per_user: usize,
    /// The GPUs to hand out (empty: a CPU-only machine).
    pub gpus: Vec<u32>,
}

pub struct Queue {
    store: Store,
    limits: Limits,
    wake: tokio::sync::Notify,
}

impl Queue {
    pub fn new(store: Store, limits: Limits) -> Queue {
        Queue {
            store,
            limits,
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Tells the scheduler to look at the queue now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Every queued task, in the order they start.
    pub async fn queued_in_order(&self) -> Result<Vec<Task>> {
        let mut queued = Vec::new();
        for record in self.store.tasks().list_all().await? {
            if record.status == TaskStatus::Queued {
                queued.push(Task::from_record(record)?);
            }
        }
        sort(&mut queued);
        Ok(queued)
    }

    /// Queue positions (1 = next to start) of every queued task, by id.
    pub async fn positions(&self) -> Result<HashMap<String, usize>> {
        Ok(self
            .queued_in_order()
            .await?
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t.task_id, i + 1))
            .collect())
    }
}

/// Priority first (higher first), then the older task, then the id.
pub fn sort(queued: &mut [Task]) {
    queued.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.task_id.cmp(&b.task_id))
    });
}

/// The queued tasks (in queue order) that may start now beside `running`, each with the GPUs
/// it gets: at most `max_concurrent` running, `max_per_user` per owner (an owner at their
/// limit is skipped, others go ahead), and strict order for GPUs (a task waiting for GPUs is
/// not overtaken by one that needs fewer).
pub fn admit<'a>(
    limits: &Limits,
    queued: &'a [Task],
    running: &[RunningSlot],
) -> Vec<(&'a Task, Vec<u32>)> {
    let mut slots: Vec<RunningSlot> = running.to_vec();
    let mut out = Vec::new();
    for task in queued {
        if slots.len() >= limits.max_concurrent {
            break;
        }
        let mine = slots.iter().filter(|r| r.owner == task.owner).count();
        if mine >= limits.max_per_user {
            continue;
        }
        let busy: Vec<u32> = slots.iter().flat_map(|r| r.gpus.iter().copied()).collect();
        let free: Vec<u32> = limits
            .gpus
            .iter()
            .copied()
            .filter(|g| !busy.contains(g))
            .collect();
        let gpus = if limits.gpus.is_empty() {
            Vec::new()
        } else if !task.spec.gpu_ids.is_empty() {
            // These GPUs and no others: the task waits (and holds its place) until they are.
            if !task.spec.gpu_ids.iter().all(|g| free.contains(g)) {
                break;
            }
            task.spec.gpu_ids.clone()
        } else {
            let want = task.spec.gpus as usize;
            if want > free.len() {
                break;
            }
            free[..want].to_vec()
        };
        slots.push(RunningSlot {
            owner: task.owner.clone(),
            gpus: gpus.clone(),
        });
        out.push((task, gpus));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::spec::TaskRequest;

    fn task(id: &str, owner: &str, priority: i32, gpus: u32) -> Task {
        let request: TaskRequest = serde_json::from_value(serde_json::json!({
            "name": id, "model_name": "m", "dataset_id": "d", "priority": priority, "gpus": gpus,
        }))
        .unwrap();
        let spec = request.into_spec().unwrap();
        let paths = crate::training::spec::RunPaths::example();
        Task::queued(id.into(), owner, spec, None, paths)
    }

    fn ids(admitted: &[(&Task, Vec<u32>)]) -> Vec<String> {
        admitted.iter().map(|(t, _)| t.task_id.clone()).collect()
    }

    #[test]
    fn priority_then_age_and_the_limits() {
        let mut queued = vec![
            task("a1", "alice", 0, 0),
            task("b1", "bob", 5, 0),
            task("a2", "alice", 0, 0),
            task("c1", "carol", 0, 0),
        ];
        sort(&mut queued);
        assert_eq!(queued[0].task_id, "b1", "priority first");
        let limits = Limits {
            max_concurrent: 3,
            max_per_user: 1,
            gpus: Vec::new(),
        };
        // alice's second waits for her first; carol goes ahead of it.
        assert_eq!(ids(&admit(&limits, &queued, &[])), ["b1", "a1", "c1"]);
        let running = [RunningSlot {
            owner: "bob".into(),
            gpus: vec![],
        }];
        assert_eq!(ids(&admit(&limits, &queued, &running)), ["a1", "c1"]);
    }

    #[test]
    fn gpus_are_handed_out_in_strict_order() {
        let queued = vec![task("big", "a", 0, 2), task("small", "b", 0, 1)];
        let limits = Limits {
            max_concurrent: 4,
            max_per_user: 4,
            gpus: vec![0, 1],
        };
        let running = [RunningSlot {
            owner: "c".into(),
            gpus: vec![0],
        }];
        assert!(
            admit(&limits, &queued, &running).is_empty(),
            "the 1-GPU task does not overtake the waiting 2-GPU one"
        );
        let admitted = admit(&limits, &queued, &[]);
        assert_eq!(admitted.len(), 1);
        assert_eq!(admitted[0].1, vec![0, 1]);
    }

    fn task_on(id: &str, gpu_ids: &[u32]) -> Task {
        let request: TaskRequest = serde_json::from_value(serde_json::json!({
            "name": id, "model_name": "m", "dataset_id": "d", "gpu_ids": gpu_ids,
        }))
        .unwrap();
        let spec = request.into_spec().unwrap();
        Task::queued(
            id.into(),
            id,
            spec,
            None,
            crate::training::spec::RunPaths::example(),
        )
    }

    #[test]
    fn a_task_on_named_gpus_gets_those_and_waits_for_them() {
        let limits = Limits {
            max_concurrent: 4,
            max_per_user: 4,
            gpus: vec![0, 1, 2, 3],
        };
        let queued = vec![task_on("on-2-3", &[3, 2]), task("any-1", "b", 0, 1)];
        assert_eq!(queued[0].spec.gpus, 2, "gpus follows gpu_ids");
        let admitted = admit(&limits, &queued, &[]);
        assert_eq!(
            admitted[0].1,
            vec![3, 2],
            "the GPUs named, not the first free"
        );
        assert_eq!(admitted[1].1, vec![0]);
        // GPU 2 busy: the named task waits, and holds its place in line.
        let running = [RunningSlot {
            owner: "c".into(),
            gpus: vec![2],
        }];
        assert!(admit(&limits, &queued, &running).is_empty());
        // Named GPUs on a machine without GPUs mean nothing to the queue (refused earlier).
        let cpu = Limits {
            gpus: Vec::new(),
            ..limits
        };
        assert_eq!(admit(&cpu, &queued, &[])[0].1, Vec::<u32>::new());
    }

    #[test]
    fn bad_gpu_ids_are_refused() {
        for (body, why) in [
            (serde_json::json!({"gpu_ids": [1, 1]}), "twice"),
            (serde_json::json!({"gpu_ids": [5000]}), "below 1024"),
            (
                serde_json::json!({"gpu_ids": [0, 1], "gpus": 1}),
                "asks for",
            ),
        ] {
            let mut b = serde_json::json!({"name": "t", "model_name": "m", "dataset_id": "d"});
            for (k, v) in body.as_object().unwrap() {
                b[k] = v.clone();
            }
            let request: TaskRequest = serde_json::from_value(b).unwrap();
            let e = request.into_spec().unwrap_err();
            assert!(e.message.contains(why), "{}", e.message);
        }
    }
}
