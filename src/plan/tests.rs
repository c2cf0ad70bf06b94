//! The planner's own tests: plans on the fake backend, and an exhaustive
//! search that no cheaper plan exists.

use super::*;
use std::collections::BTreeMap;

fn d(name: &str, parent: Option<&str>, t: i64) -> CheckpointDef {
    CheckpointDef {
        name: name.into(),
        parent: parent.map(Into::into),
        creation_time: t,
        description: None,
        disks: BTreeMap::from([("sda".to_string(), name.to_string())]),
    }
}

fn line(n: usize) -> Vec<CheckpointDef> {
    (0..n)
        .map(|i| {
            let p = (i > 0).then(|| format!("c{}", i - 1));
            d(&format!("c{i}"), p.as_deref(), i as i64)
        })
        .collect()
}

fn ops(p: &Plan) -> Vec<String> {
    p.steps
        .iter()
        .map(|s| match s {
            Step::Delete { before } => format!("-{}", before.name),
            Step::Redefine {
                def, forced: false, ..
            } => format!("+{}", def.name),
            Step::Redefine {
                def, forced: true, ..
            } => format!("={}", def.name),
        })
        .collect()
}

#[test]
fn empty_to_chain_redefines_all_parent_first() {
    let p = plan(&[], &line(3));
    assert_eq!(ops(&p), ["+c0", "+c1", "+c2"]);
}

#[test]
fn equal_state_plans_nothing() {
    let p = plan(&line(4), &line(4));
    assert!(p.is_empty());
    assert_eq!(p.unchanged, ["c0", "c1", "c2", "c3"]);
}

#[test]
fn prefix_redefines_only_the_rest() {
    assert_eq!(ops(&plan(&line(2), &line(4))), ["+c2", "+c3"]);
}

#[test]
fn conflicting_checkpoint_is_replaced_with_its_before_image() {
    let mut cur = line(3);
    cur[1].creation_time = 99;
    let p = plan(&cur, &line(3));
    assert_eq!(ops(&p), ["+c1"]);
    assert!(matches!(&p.steps[0], Step::Redefine { before: Some(b), .. } if b.creation_time == 99));
}

#[test]
fn extras_are_deleted_children_first_and_the_path_walked_again() {
    // x1 -> x2 hang off c1; c2 already matches but current may sit on c1.
    let mut cur = line(3);
    cur.push(d("x1", Some("c1"), 10));
    cur.push(d("x2", Some("x1"), 11));
    let p = plan(&cur, &line(4));
    assert_eq!(ops(&p), ["-x2", "-x1", "=c2", "+c3"]);
}

#[test]
fn extras_below_the_leaf_need_no_forced_redefine() {
    let mut cur = line(3);
    cur.push(d("x", Some("c2"), 10));
    assert_eq!(ops(&plan(&cur, &line(3))), ["-x"]);
}

#[test]
fn a_tree_redefines_the_path_to_its_leaf_before_other_branches() {
    // c0 <- a (older branch), c0 <- b1 <- b2 (the newest leaf), and a
    // second root r. Redefining a while c0 is current would make a
    // current, and b1 and b2 would then not take it.
    let tree = vec![
        d("c0", None, 0),
        d("a", Some("c0"), 1),
        d("b1", Some("c0"), 2),
        d("r", None, 3),
        d("b2", Some("b1"), 4),
    ];
    assert_eq!(ops(&plan(&[], &tree)), ["+c0", "+b1", "+b2", "+a", "+r"]);
    // With c0 in libvirt (current, as its sync left it), the path goes
    // on from it.
    assert_eq!(ops(&plan(&tree[..1], &tree)), ["+b1", "+b2", "+a", "+r"]);
}

/// Run `plan` on the fake from `before` — libvirt's current checkpoint
/// on its newest leaf, as a backup or a sync leaves it, or, with
/// `restart`, where a daemon restart puts it — and return the plan and
/// the current checkpoint it left.
fn run(
    before: &[CheckpointDef],
    restart: bool,
    target: &[CheckpointDef],
) -> (Plan, Option<String>) {
    use crate::backend::fake::FakeBackend;
    use crate::backend::Backend;
    let fake = FakeBackend::new();
    fake.define_domain("d", "93a5c045-6457-2c09-e56c-927cdf34e178", &["sda"], false);
    fake.set_checkpoints("d", before.to_vec());
    if restart {
        fake.restart();
    }
    let p = plan(&fake.peek("d"), target);
    for s in &p.steps {
        match s {
            Step::Delete { before } => fake.delete("d", &before.name),
            Step::Redefine { def, .. } => {
                fake.redefine("d", &crate::xml::render_checkpoint(def), false)
            }
        }
        .unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }
    assert!(same_content(&fake.peek("d"), target), "{:?}", ops(&p));
    (p, fake.current("d"))
}

/// `line(n)` without its first `k` checkpoints (retention).
fn line_from(k: usize, n: usize) -> Vec<CheckpointDef> {
    let mut v = line(n).split_off(k);
    v[0].parent = None;
    v
}

#[test]
fn dropping_the_oldest_checkpoint_is_one_delete() {
    // libvirt re-parents c1 to nothing itself: c1..c7 already match.
    let (p, current) = run(&line(8), false, &line_from(1, 8));
    assert_eq!(ops(&p), ["-c0"]);
    assert_eq!(current.as_deref(), Some("c7"));
    // Daily retention of a 1,000-checkpoint chain.
    let (p, current) = run(&line(1000), false, &line_from(1, 1000));
    assert_eq!(ops(&p), ["-c0"]);
    assert_eq!(current.as_deref(), Some("c999"));
    let (p, _) = run(&line(1000), false, &line_from(3, 1000));
    assert_eq!(ops(&p), ["-c2", "-c1", "-c0"]);
}

#[test]
fn dropping_a_middle_checkpoint_is_one_delete() {
    let mut target = line(5);
    target.remove(2);
    target[2].parent = Some("c1".into());
    let (p, current) = run(&line(5), false, &target);
    assert_eq!(ops(&p), ["-c2"]);
    assert_eq!(current.as_deref(), Some("c4"));
}

#[test]
fn dropping_an_old_side_checkpoint_is_one_delete_and_at_most_one_forced_redefine() {
    // c0 <- {a, c1 <- c2}: a is the oldest branch.
    let before = vec![
        d("c0", None, 0),
        d("a", Some("c0"), 1),
        d("c1", Some("c0"), 2),
        d("c2", Some("c1"), 3),
    ];
    let target: Vec<_> = before.iter().filter(|d| d.name != "a").cloned().collect();
    for restart in [false, true] {
        let (p, current) = run(&before, restart, &target);
        assert_eq!(p.deleted(), ["a"]);
        assert!(p.steps.len() <= 2, "{:?}", ops(&p));
        assert_eq!(current.as_deref(), Some("c2"), "restart={restart}");
    }
}

#[test]
fn deleting_on_one_branch_and_adding_the_leaf_on_another_makes_the_new_leaf_current() {
    // c0 <- {a, b <- b2}, current b2. The sync drops b2 and adds n
    // under a: deleting b2 makes b current, off n's path.
    let before = vec![
        d("c0", None, 0),
        d("a", Some("c0"), 1),
        d("b", Some("c0"), 2),
        d("b2", Some("b"), 3),
    ];
    let mut target: Vec<_> = before[..3].to_vec();
    target.push(d("n", Some("a"), 4));
    for restart in [false, true] {
        let (p, current) = run(&before, restart, &target);
        assert_eq!(
            current.as_deref(),
            Some("n"),
            "restart={restart}: {:?}",
            ops(&p)
        );
        // One delete, n, and one more redefine to move the current one.
        assert_eq!(p.steps.len(), 3, "{:?}", ops(&p));
    }
}

#[test]
fn after_a_restart_a_sync_of_an_older_branch_leaves_the_newest_leaf_current() {
    // c0 <- {a, b}: after a restart libvirt has no current checkpoint,
    // and a2, added under the older branch a, would take it.
    let before = vec![
        d("c0", None, 0),
        d("a", Some("c0"), 1),
        d("b", Some("c0"), 3),
    ];
    let mut target = before.clone();
    target.push(d("a2", Some("a"), 2));
    let (p, current) = run(&before, true, &target);
    assert_eq!(current.as_deref(), Some("b"), "{:?}", ops(&p));
    assert_eq!(p.steps.len(), 2, "{:?}", ops(&p));
    // Without a restart b is current already: a2 alone would do, and
    // the plan may cost one call more to be right in both cases.
    let (p, current) = run(&before, false, &target);
    assert_eq!(current.as_deref(), Some("b"));
    assert!(p.steps.len() <= 2, "{:?}", ops(&p));
}

#[test]
fn a_new_root_as_the_leaf_becomes_current() {
    // Beside a line...
    let mut target = line(3);
    target.push(d("r", None, 10));
    let (p, current) = run(&line(3), false, &target);
    assert_eq!(current.as_deref(), Some("r"), "{:?}", ops(&p));
    assert_eq!(p.steps.len(), 2, "{:?}", ops(&p));
    // ...and beside a tree, after a restart or not.
    let tree = vec![
        d("c0", None, 0),
        d("a", Some("c0"), 1),
        d("b", Some("c0"), 2),
    ];
    let mut target = tree.clone();
    target.push(d("r", None, 10));
    for restart in [false, true] {
        let (p, current) = run(&tree, restart, &target);
        assert_eq!(
            current.as_deref(),
            Some("r"),
            "restart={restart}: {:?}",
            ops(&p)
        );
        assert!(p.steps.len() <= 2, "{:?}", ops(&p));
    }
}

#[test]
fn same_content_ignores_order() {
    let mut a = line(3);
    let b = line(3);
    a.reverse();
    assert!(same_content(&a, &b));
    a[0].description = Some("x".into());
    assert!(!same_content(&a, &b));
}

/// Exhaustive search over every sequence of libvirt calls (delete what the
/// target lacks; redefine a target checkpoint with its content, or under
/// any other parent) from random small states: no sequence reaches the target with
/// the leaf current for every start in fewer calls than the plan, and the
/// plan settles for the likeliest start only when covering every start
/// would cost more than one call above that.
#[test]
fn no_shorter_sequence_of_calls_exists() {
    use std::collections::HashSet;
    let mut seed = 0x5eed_u64;
    let mut next = move |n: u64| {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let pool = ["a", "b", "c", "d"];
    let mut searched = 0;
    let mut robust = 0;
    for _ in 0..300 {
        let mut pick = |max: u64, offset: i64| {
            let mut v: Vec<CheckpointDef> = Vec::new();
            for (i, name) in pool.iter().enumerate() {
                if v.len() as u64 >= max || next(2) == 0 {
                    continue;
                }
                let parent = match next(v.len() as u64 + 1) {
                    0 => None,
                    k => Some(v[k as usize - 1].name.clone()),
                };
                let t = i as i64 + if next(4) == 0 { offset } else { 0 };
                v.push(d(name, parent.as_deref(), t));
            }
            v
        };
        let listing = pick(3, 100);
        let target = pick(3, 0);
        if target.is_empty() {
            continue;
        }
        let kind = next(4);
        let mut any = || match next(listing.len() as u64 + 1) {
            0 => None,
            k => Some(listing[k as usize - 1].name.clone()),
        };
        let at = match kind {
            0 => Current::assumed(&listing),
            1 => Current::one_of([any()]),
            2 => Current::one_of([any(), None]),
            _ => Current::one_of([any(), any(), None]),
        };
        let p = plan_from(&listing, &target, &at);
        let leaf = leaf_of(&target).map(|l| l.name.as_str());
        let order = order_defs(&target);
        let starts: Vec<Option<&str>> = at.candidates().iter().map(Option::as_deref).collect();
        let start = Model::new(&listing, starts.iter().copied(), &order);
        let at_goal = |m: &Model| {
            m.names().len() == target.len() && target.iter().all(|t| m.settled(&t.name))
        };
        // The plan, in the model.
        let mut m = start.clone();
        for s in &p.steps {
            match s {
                Step::Delete { before } => m.delete(&before.name).unwrap(),
                Step::Redefine { def, .. } => {
                    let t = order.iter().find(|t| t.name == def.name).unwrap();
                    let parent = def
                        .parent
                        .as_deref()
                        .and_then(|p| pool.iter().copied().find(|n| *n == p));
                    m.redefine(t, parent).unwrap();
                }
            }
        }
        assert!(at_goal(&m), "{listing:?} -> {target:?}");
        let plan_robust = m.currents().iter().all(|c| *c == leaf);
        let cost = p.steps.len();
        // Breadth first, up to one call more than the plan.
        let (mut primary, mut all) = (None, None);
        let mut seen = HashSet::new();
        let mut level = vec![start];
        for depth in 0..=cost + 1 {
            for m in &level {
                if at_goal(m) {
                    if m.currents()[0] == leaf {
                        primary.get_or_insert(depth);
                    }
                    if m.currents().iter().all(|c| *c == leaf) {
                        all.get_or_insert(depth);
                    }
                }
            }
            if all.is_some() || depth == cost + 1 {
                break;
            }
            let mut next_level = Vec::new();
            for m in &level {
                // The planner never deletes a checkpoint the target keeps
                // (to re-create it): neither does the search.
                for name in m
                    .names()
                    .into_iter()
                    .filter(|n| !order.iter().any(|t| t.name == *n))
                {
                    let mut n = m.clone();
                    if n.delete(name).is_ok() && seen.insert(n.state()) {
                        next_level.push(n);
                    }
                }
                for t in &order {
                    let parents = std::iter::once(None).chain(m.names().into_iter().map(Some));
                    for parent in parents {
                        let mut n = m.clone();
                        if n.redefine(t, parent).is_ok() && seen.insert(n.state()) {
                            next_level.push(n);
                        }
                    }
                }
            }
            level = next_level;
        }
        let primary = primary.expect("the plan itself reaches the target");
        let label = format!("{listing:?} at {at:?} -> {target:?}: {:?}", p.steps);
        if plan_robust {
            robust += 1;
            assert_eq!(all, Some(cost), "{label}");
            assert!(cost <= primary + 1, "{label}");
        } else {
            assert_eq!(primary, cost, "{label}");
            assert!(all.is_none_or(|a| a > primary + 1), "{label}");
            assert!(!p.warnings.is_empty(), "{label}");
        }
        searched += 1;
    }
    assert!(
        searched > 150 && robust > 100,
        "{searched} searched, {robust} robust"
    );
}

/// A replay's model follows the fake call by call (content, re-parenting
/// included), and the shape it keeps as it goes agrees with libvirt's
/// restart rule computed afresh (the fake's, and the planner's own), after
/// every delete and redefine of random sequences.
#[test]
fn a_replay_knows_where_a_restart_puts_the_current_checkpoint() {
    use crate::backend::fake::FakeBackend;
    use crate::backend::Backend;
    let mut seed = 0x7e57_u64;
    let mut next = move |n: u64| {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    };
    let names = ["a", "b", "c", "d", "e", "f"];
    // Every definition a step may write: each name under each other name,
    // or as a root.
    let defs: Vec<CheckpointDef> = names
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            std::iter::once(None)
                .chain(names.iter().map(|p| Some(*p)))
                .filter(move |p| *p != Some(*n))
                .map(move |p| d(n, p, i as i64))
        })
        .collect();
    let mut checked = 0;
    for _ in 0..200 {
        let fake = FakeBackend::new();
        fake.define_domain("r", "93a5c045-6457-2c09-e56c-927cdf34e178", &["sda"], false);
        let mut m = Model::new(&[], [None], &[]).trusting();
        for _ in 0..12 {
            let have = m.names();
            if !have.is_empty() && next(3) == 0 {
                let n = have[next(have.len() as u64) as usize];
                m.delete(n).unwrap();
                fake.delete("r", n).unwrap();
            } else {
                let def = &defs[next(defs.len() as u64) as usize];
                let xml = crate::xml::render_checkpoint(def);
                // A replay holds only calls libvirt accepted.
                if fake.redefine("r", &xml, false).is_ok() {
                    m.redefine(def, def.parent.as_deref()).unwrap();
                }
            }
            let listing = fake.peek("r");
            assert!(same_content(&m.state().0, &listing), "{listing:?}");
            let afresh = model::after_restart(&listing);
            assert_eq!(m.restart_point(), afresh, "{listing:?}");
            fake.restart();
            assert_eq!(fake.current("r").as_deref(), afresh, "{listing:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 2400);
}
