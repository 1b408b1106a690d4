use super::*;
use proptest::prelude::*;

fn level(active: u32) -> Level {
    Level { active, class: Class::DEFAULT }
}

type S = Scheduler<&'static str, u32, u32>;

fn started(s: &mut S, now: Tick) -> Vec<(&'static str, u32)> {
    std::iter::from_fn(|| s.next(now)).map(|st| (st.object, st.job)).collect()
}

#[test]
fn the_least_redundant_volume_goes_first_then_the_class_then_arrival() {
    let policy = Policy::default();
    let mut s = S::new(1);
    s.submit("big", 1, 3, policy.level(2, None)).unwrap();
    s.submit("gold", 2, 3, policy.level(2, Some(Class(0)))).unwrap();
    s.submit("fragile", 3, 3, policy.level(1, None)).unwrap();
    s.submit("later", 4, 3, policy.level(2, None)).unwrap();
    let mut order = Vec::new();
    while let Some(st) = s.next(0) {
        assert_eq!(s.next(0), None, "one at a time");
        assert_eq!(s.load(), Load { running: 1, waiting: 3 - order.len() });
        order.push(st.object);
        s.finished(&st.job).unwrap();
        s.validate().unwrap();
    }
    assert_eq!(order, ["fragile", "gold", "big", "later"]);
    assert_eq!(s.load(), Load::default());
}

#[test]
fn objects_of_one_level_take_turns() {
    let mut s = S::new(2);
    for job in 0..4 {
        s.submit("many", job, 3, level(2)).unwrap();
    }
    s.submit("one", 10, 3, level(2)).unwrap();
    s.submit("two", 20, 3, level(2)).unwrap();
    s.submit("two", 21, 3, level(2)).unwrap();
    let first = started(&mut s, 0);
    assert_eq!(first, [("many", 0), ("one", 10)], "the threshold holds the rest");
    let mut order = first.clone();
    for (_, job) in first {
        s.finished(&job).unwrap();
    }
    loop {
        let batch = started(&mut s, 0);
        if batch.is_empty() {
            break;
        }
        for (_, job) in &batch {
            s.finished(job).unwrap();
        }
        order.extend(batch);
        s.validate().unwrap();
    }
    let jobs: Vec<u32> = order.iter().map(|(_, j)| *j).collect();
    assert_eq!(jobs, [0, 10, 20, 1, 21, 2, 3], "round robin, each object's jobs in order");
}

#[test]
fn a_refused_job_keeps_its_place_and_its_target_rests() {
    let mut s = S::new(1);
    s.submit("a", 1, 3, level(2)).unwrap();
    s.submit("b", 2, 3, level(2)).unwrap();
    s.submit("c", 3, 2, level(2)).unwrap();
    let st = s.next(0).unwrap();
    assert_eq!(st.job, 1);
    s.refused(&1, 100).unwrap();
    s.validate().unwrap();
    assert_eq!(s.wake_at(0), Some(100));
    // Node 3 refuses until 100: only the job writing to node 2 may start.
    let st = s.next(50).unwrap();
    assert_eq!(st.job, 3);
    assert_eq!(s.next(50), None, "the threshold");
    s.finished(&3).unwrap();
    assert_eq!(s.next(99), None, "node 3 rests");
    assert_eq!(s.next(100).map(|st| st.job), Some(1), "back at the front");
    assert_eq!(s.refused(&2, 200), Err(ScheduleError::NotRunning("2".into())));
    assert_eq!(s.finished(&9), Err(ScheduleError::Unknown("9".into())));
    assert_eq!(s.submit("a", 1, 3, level(2)), Err(ScheduleError::Duplicate("1".into())));
}

#[test]
fn a_waiting_job_that_ends_leaves_its_queue_and_a_new_level_moves_the_object() {
    let mut s = S::new(1);
    s.submit("a", 1, 3, level(2)).unwrap();
    s.submit("b", 2, 3, level(2)).unwrap();
    s.finished(&1).unwrap();
    s.validate().unwrap();
    assert_eq!(s.load(), Load { running: 0, waiting: 1 });
    s.submit("c", 3, 3, level(2)).unwrap();
    // b's redundancy dropped: its queue moves to the more urgent level.
    s.submit("b", 4, 3, level(1)).unwrap();
    s.submit("c", 5, 3, level(2)).unwrap();
    s.validate().unwrap();
    let mut order = Vec::new();
    while let Some(st) = s.next(0) {
        order.push(st.job);
        s.finished(&st.job).unwrap();
    }
    assert_eq!(order, [2, 4, 3, 5]);
}

#[test]
fn slots_are_bounded_renewed_released_and_expire() {
    let mut slots = Slots::new(1);
    assert!(slots.acquire((1, 7), 0, 30));
    assert!(!slots.acquire((2, 8), 10, 40), "one slot");
    assert!(slots.acquire((1, 7), 20, 50), "renewed");
    assert!(!slots.acquire((2, 8), 40, 70), "still held");
    assert_eq!(slots.held(49), 1);
    assert!(slots.acquire((2, 8), 50, 80), "the holder did not renew: it is free");
    assert!(slots.release(&(2, 8)));
    assert!(!slots.release(&(2, 8)));
    assert_eq!(slots.held(50), 0);
    slots.validate().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Submit { object: u8, target: u8, active: u32 },
    Next,
    Finish(usize),
    Refuse(usize, u64),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5, 0u8..3, 0u32..3).prop_map(|(object, target, active)| Op::Submit {
            object,
            target,
            active
        }),
        Just(Op::Next),
        Just(Op::Next),
        any::<usize>().prop_map(Op::Finish),
        (any::<usize>(), 1u64..50).prop_map(|(k, d)| Op::Refuse(k, d)),
        (1u64..40).prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Never more than the threshold run; a job starts only if no more urgent one that
    /// could start waits; every job submitted starts once the others finish.
    #[test]
    fn the_threshold_the_order_and_every_job_starts(
        threshold in 1usize..4,
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut s: Scheduler<u8, u32, u8> = Scheduler::new(threshold);
        let mut now: Tick = 0;
        let mut next_job = 0u32;
        // Waiting jobs: job -> (level, target); the model's refusals: target -> until.
        let mut waiting: BTreeMap<u32, (Level, u8)> = BTreeMap::new();
        let mut refusing: BTreeMap<u8, Tick> = BTreeMap::new();
        let mut running: Vec<(u32, Level, u8)> = Vec::new();
        let mut started = std::collections::BTreeSet::new();
        let mut start = |s: &mut Scheduler<u8, u32, u8>, now: Tick,
                         waiting: &mut BTreeMap<u32, (Level, u8)>,
                         refusing: &BTreeMap<u8, Tick>,
                         running: &mut Vec<(u32, Level, u8)>| -> Result<bool, TestCaseError> {
            let Some(st) = s.next(now) else {
                // None only at the threshold or when every waiting job's target refuses.
                let free =
                    waiting.values().any(|(_, t)| refusing.get(t).is_none_or(|u| *u <= now));
                let full = running.len() >= threshold;
                prop_assert!(full || !free, "nothing started though it could");
                return Ok(false);
            };
            prop_assert!(running.len() < threshold);
            let (level, target) = waiting.remove(&st.job).expect("a waiting job started");
            prop_assert_eq!((level, target), (st.level, st.target));
            prop_assert!(refusing.get(&target).is_none_or(|u| *u <= now), "its target refuses");
            for (l, t) in waiting.values() {
                let could = refusing.get(t).is_none_or(|u| *u <= now);
                prop_assert!(!could || *l >= level, "{l:?} waits while {level:?} starts");
            }
            running.push((st.job, level, target));
            started.insert(st.job);
            Ok(true)
        };
        for op in ops {
            match op {
                Op::Submit { object, target, active } => {
                    let level = Level { active, class: Class::DEFAULT };
                    s.submit(object, next_job, target, level).unwrap();
                    // The object takes the latest level: its waiting jobs with it.
                    for (j, (l, _)) in waiting.iter_mut() {
                        if s.jobs[j].object == object {
                            *l = level;
                        }
                    }
                    waiting.insert(next_job, (level, target));
                    next_job += 1;
                }
                Op::Next => {
                    start(&mut s, now, &mut waiting, &refusing, &mut running)?;
                }
                Op::Finish(k) if !running.is_empty() => {
                    let (job, _, _) = running.remove(k % running.len());
                    s.finished(&job).unwrap();
                }
                Op::Refuse(k, d) if !running.is_empty() => {
                    let (job, _, target) = running.remove(k % running.len());
                    s.refused(&job, now + d).unwrap();
                    let until = refusing.entry(target).or_insert(now + d);
                    *until = (*until).max(now + d);
                    let level = s.objects[&s.jobs[&job].object].level;
                    waiting.insert(job, (level, target));
                }
                Op::Finish(_) | Op::Refuse(..) => {}
                Op::Wait(d) => now += d,
            }
            s.validate().map_err(TestCaseError::fail)?;
            prop_assert!(s.load().running <= threshold);
            prop_assert_eq!(s.load(), Load { running: running.len(), waiting: waiting.len() });
        }
        // Liveness: with the others finishing, every waiting job starts.
        let mut rounds = 0;
        while !waiting.is_empty() {
            rounds += 1;
            prop_assert!(rounds < 10_000, "jobs never start");
            if !start(&mut s, now, &mut waiting, &refusing, &mut running)? {
                match running.pop() {
                    Some((job, _, _)) => s.finished(&job).unwrap(),
                    None => now = s.wake_at(now).expect("a refusal to wait out"),
                }
            }
        }
        prop_assert!((0..next_job).all(|j| started.contains(&j)), "every job started");
    }
}
