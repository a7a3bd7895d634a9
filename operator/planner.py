"""A placement planner with memory: each pending job's outcome is kept between passes (pure, no I/O).

`placement.plan_placement` decides every pending job afresh on every pass. Most of them
come out as they did last time: a job waiting for a busy agent that holds its model keeps
waiting for it. `Planner` runs the same placement, job by job in the same order over the
same virtual fleet (`placement.open_pass`), and remembers what each placement read (a
`placement.PassObserver`): the agents it looked at, each through its view object and what
earlier jobs of the pass did to it, and for each what it read (whether it has a free slot,
the tier it holds an artifact in, its wait for a slot, the job's option on it or a lower
bound of that); which agents hold the job's artifacts; the demand for the eviction victims
it valued; the free holders it weighed and the busy holders it found (both capped by
`holder_candidates`); the free agents the ranking of all of them offered for a cold load,
when it looked there; the victim clock (`PlacementSettings.victim_clock_step_s`) and the
job's age (past `max_hot_wait_age_s` or not).

On the next pass a job whose inputs are all unchanged is not placed again: what its
placement did to the virtual fleet (taking the next slot of the agent it waits for) is
replayed and its outcome reused, so later jobs see exactly the fleet they would have seen.
When only some agents changed, the outcome of a job waiting for agent W still stands if W
still holds its checkpoint with no free slot and its option on W (weighed again if W
changed) still costs less than everything else did, no busy holder would now be left out
by the cap, and every agent that changed, is new to its artifacts or is now a candidate
(a free holder under the cap, an agent the cold ranking offers) has an option (its lower
bound first, weighed only if needed) that costs strictly more than W's: the
placement is the cheapest option weighed, and it skips only options that cannot beat the
best, so the winner and whether it is weighed stay the same. A pass thus costs in
proportion to what changed, and its decisions are `plan_placement`'s on the same arguments;
tests check that pass by pass on simulated fleets and on hundreds of random ones. The
caller must reuse an agent's `AgentView` object while the agent is unchanged (the operator
reuses a view until its CacheAgent changes): a new object counts as a change.

Promises: a job first left waiting for a busy agent is promised the start time that wait
implied. If it is still pending `margin_s + margin_share * wait` after that time, the
promise is broken (the estimate was wrong: a job stuck on that agent, a stale report), and
the job is placed again with the overrun counted: waiting for any busy agent costs that
much more (`JobView.overrun_s`), and more with every pass, so the job goes where it can
start now as soon as that is cheaper, instead of waiting out `max_hot_wait_age_s` or
hopping from one stuck holder to the next. The promise stays with the job until it is bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from stoker.operator import placement
from stoker.operator.placement import (
    AgentView,
    ArtifactInfo,
    Binding,
    FleetIndex,
    JobView,
    PlacementError,
    PlacementPlan,
    PlacementSettings,
    Tier,
    Unplaceable,
    Waiting,
)

__all__ = ["Planner", "PlannerStats", "Promise", "PromiseSettings"]

Outcome = Binding | Waiting | Unplaceable


@dataclass(frozen=True, slots=True)
class PromiseSettings:
    """When a waiting job's promised start counts as broken."""

    margin_s: float = 10.0
    """Slack beyond the promised start, in seconds, before the promise counts as broken."""
    margin_share: float = 0.5
    """Plus this share of the promised wait: long estimates are rougher."""

    def __post_init__(self) -> None:
        if not (self.margin_s >= 0 and self.margin_share >= 0):
            raise PlacementError(f"PromiseSettings margins must be >= 0, got {self.margin_s!r}, {self.margin_share!r}")

    def broken_by(self, promise: Promise, now: float) -> float:
        """Seconds by which `promise` is overrun at `now`, once it counts as broken; else 0."""
        overrun = now - promise.start_s
        return overrun if overrun > self.margin_s + self.margin_share * promise.wait_s else 0.0


@dataclass(frozen=True, slots=True)
class Promise:
    """The start a waiting job was promised: `wait_s` after `made_s`, on `agent`."""

    agent: str
    made_s: float
    wait_s: float

    @property
    def start_s(self) -> float:
        return self.made_s + self.wait_s


@dataclass(slots=True)
class PlannerStats:
    passes: int = 0
    placed: int = 0
    """Jobs placed afresh (their inputs changed, or first seen)."""
    reused: int = 0
    """Jobs whose remembered outcome was replayed."""
    broken_promises: int = 0
    """Placements made with an overrun counted."""


_FULL = ("read in full",)
"""Marks an agent read in full other than to weigh the job's option on it (reserving it,
ranking it for a cold load): any change to it means placing the job again."""
_FLOORED = ("bounded",)
"""Marks an agent whose option was not weighed: its floor (a fact) already exceeded the best."""
_INF = float("inf")

Log = tuple[tuple[str, str, float], ...]


class _Read:
    """What one placement read of one agent."""

    __slots__ = ("name", "view", "log", "facts", "deep", "option", "cost", "state_reads", "victim_keys",
                 "victim_gained", "decays")

    def __init__(self, name: str, view: AgentView | None, log: Log) -> None:
        self.name = name
        self.view = view
        """The view it was copied from (None: not eligible) ..."""
        self.log = log
        """... and what earlier jobs of the pass had done to it: together, the agent's whole state."""
        self.facts: dict[tuple[str, str], object] = {}
        """Facts read: ("free", "") -> has a free slot, ("tier", key) -> tier, ("wait", "") -> wait for a
        slot, ("floor", "") -> the cost its option has at least (its option not weighed)."""
        self.deep = False
        """Read in full (to weigh the job's option on it, or more)."""
        self.option: tuple[object, ...] | None = _FULL
        """The job's option on it, weighed and nothing else: its signature (None: it does not fit)."""
        self.cost = _INF
        """That option's cost, or its floor."""
        self.state_reads = 0
        self.victim_keys: frozenset[str] = frozenset()
        """Eviction victims valued on it (by their demand, and their copies elsewhere) ..."""
        self.victim_gained: dict[str, tuple[str, ...]] = {}
        """... and, for those that agents got earlier in the pass, which agents."""
        self.decays = False
        """Victims valued on it by their use, on the victim clock."""


@dataclass(slots=True)
class _Entry:
    """A remembered placement and everything it was computed from."""

    job: JobView
    outcome: Waiting | Unplaceable
    effects: tuple[tuple[str, str, float], ...]
    pass_no: int
    """The last pass it was computed or found to hold in."""
    now: float
    victim_now: float
    aged: bool
    links: tuple[float, float]
    reads: list[_Read]
    keys: list[tuple[str, tuple[str, ...], frozenset[str]]]
    """(artifact, agents that got it earlier in the pass, agents holding it) for the artifacts
    whose holders it looked up."""
    fleet: bool
    """It read something of every agent (whether each one failed the job)."""
    cold_log: tuple[tuple[str, str, str], ...]
    free: tuple[str, ...]
    """The free holders it weighed."""
    busy: int
    """The busy holders of the checkpoint it found."""
    busy_cut: tuple[str, ...] | None
    """Their names, when it found as many as it looks for (which ones depends on the fleet's order)."""
    cold: tuple[str, ...] | None
    """The free agents it took from the ranking of all of them for a cold load, if it looked there."""
    truncated: bool
    """It left out busy holders beyond the cap: which were weighed depends on every wait."""
    runner_up: float
    """Nothing but the option waited for can cost less: the lowest cost (or floor) of the others
    weighed, and of the bounds below which nothing was skipped (lowered as agents change)."""

    def winner(self) -> _Read | None:
        """The agent the job waits for, when only what could beat it counts; None when any change does."""
        outcome = self.outcome
        if isinstance(outcome, Waiting) and not outcome.reserved and not self.truncated and not self.fleet:
            for read in self.reads:
                if read.name == outcome.agent and read.option is not _FULL and read.option is not _FLOORED:
                    return read
        return None


class _Observer:
    """Collects what one placement reads (see `placement.PassObserver`)."""

    __slots__ = ("fleet", "reads", "keys", "noted", "noted_tiers", "noted_waits", "all_agents", "free", "busy", "busy_cut", "picked",
                 "cut", "bounds")

    def __init__(self, fleet: placement._Fleet) -> None:
        self.fleet = fleet
        self.reset()

    def reset(self) -> None:
        self.reads: dict[str, _Read] = {}
        self.keys: dict[str, tuple[str, tuple[str, ...], frozenset[str]]] = {}
        self.noted: dict[str, tuple[tuple[str, ...], Iterable[str]]] = {}
        """Artifact -> (agents that gained it earlier in the pass, its holders) as looked up; `finish`
        turns them into `keys` and facts."""
        self.noted_tiers: list[tuple[str, list[tuple[str, Tier | None]]]] = []
        """Tiers read in bulk (of the free or busy holders of an artifact), made facts in `finish`."""
        self.noted_waits: list[list[tuple[str, float]]] = []
        """Waits read in bulk (of the busy holders of the checkpoint), made facts in `finish`."""
        self.all_agents = False
        self.free: tuple[str, ...] = ()
        self.busy = 0
        self.busy_cut: tuple[str, ...] | None = None
        self.picked: tuple[str, ...] | None = None
        self.cut = False
        self.bounds: list[float] = []

    def _read(self, name: str) -> _Read:
        read = self.reads.get(name)
        if read is None:
            fleet = self.fleet
            read = self.reads[name] = _Read(name, fleet.views.get(name), fleet.log_of(name))
        return read

    def agent(self, name: str) -> None:
        read = self._read(name)
        read.deep = True
        read.state_reads += 1

    def option(self, name: str, option: placement._Option | None) -> None:
        read = self._read(name)
        read.option = None if option is None else option.signature()
        read.cost = _INF if option is None else option.cost_s

    def floor(self, name: str, floor_s: float | None) -> None:
        read = self._read(name)
        read.facts[("floor", "")] = floor_s
        read.option = _FLOORED
        read.cost = _INF if floor_s is None else floor_s

    def bound(self, cost_s: float) -> None:
        self.bounds.append(cost_s)

    def fact(self, name: str, what: str, arg: str, value: object) -> None:
        self._read(name).facts.setdefault((what, arg), value)

    def holders(self, key: str, names: Iterable[str]) -> None:
        # Noted now, read in `finish`: a job that is bound (most of them, with free agents about)
        # leaves nothing to remember, and a popular model has hundreds of holders.
        if key not in self.noted:
            self.noted[key] = (self.fleet.gained_of(key), names)

    def tiers(self, key: str, tiers: list[tuple[str, Tier | None]]) -> None:
        self.noted_tiers.append((key, tiers))  # like `holders`: facts only for a job that is not bound

    def waits(self, waits: list[tuple[str, float]]) -> None:
        self.noted_waits.append(waits)

    def victims(self, name: str, vram: bool, keys: tuple[str, ...], decays: bool) -> None:
        read = self._read(name)
        read.victim_keys = read.victim_keys.union(keys)
        gained = self.fleet.gained
        if gained:
            for key in keys:
                if key in gained:
                    read.victim_gained[key] = self.fleet.gained_of(key)
        read.decays = read.decays or decays

    def whole_fleet(self) -> None:
        self.all_agents = True

    def free_candidates(self, names: tuple[str, ...]) -> None:
        self.free = names

    def busy_candidates(self, count: int, cut: tuple[str, ...] | None) -> None:
        self.busy, self.busy_cut = count, cut

    def cold(self, picked: tuple[str, ...]) -> None:
        self.picked = picked

    def truncated(self) -> None:
        self.cut = True

    def finish(self, winner: str | None) -> tuple[list[_Read], float]:
        """The reads, and the runner-up bound of a job waiting for `winner`."""
        fleet = self.fleet
        free = fleet.free_names
        # Whether each holder had a free slot when the job was placed: as now, but for an agent the
        # job itself reserved (its slots are held back since). The job's other effects change no
        # holder's slots, and each agent it affected was read before, with the log it had then.
        reserved = {name for name, what, _ in fleet.effects if what == "reserve"}
        for key, tiers in self.noted_tiers:
            for name, tier in tiers:
                self.fact(name, "tier", key, tier)
        for waits in self.noted_waits:
            for name, wait in waits:
                self.fact(name, "wait", "", wait)
        for key, (gained, names) in self.noted.items():
            holders = frozenset(names)
            self.keys[key] = (key, gained, holders)
            for name in holders:
                self.fact(name, "free", "", name in free or name in reserved)
        runner_up = min(self.bounds, default=_INF)
        for read in self.reads.values():
            if read.deep and read.state_reads != 1:
                read.option = _FULL
            if read.name != winner:
                runner_up = min(runner_up, read.cost)
        return list(self.reads.values()), runner_up


class Planner:
    """`plan_placement` with memory between passes (see the module docstring).

    Keep one per fleet (the operator keeps one per namespace) and call `plan` on every pass
    with the whole fleet; `forget` jobs that left the queue (bound jobs are forgotten here)."""

    def __init__(self, settings: PlacementSettings = PlacementSettings(), *,
                 promises: PromiseSettings | None = PromiseSettings()) -> None:
        self.settings = settings
        self.promise_settings = promises
        self.index = FleetIndex()
        self.stats = PlannerStats()
        self._entries: dict[str, _Entry] = {}
        self._promises: dict[str, Promise] = {}
        self._pass = 0
        self._views: dict[str, AgentView] = {}
        self._sizes: Mapping[str, ArtifactInfo] | None = None
        self._key_epoch: dict[str, int] = {}
        """Artifact key -> the pass in which the set of agents holding it last changed."""
        self._demand: dict[str, int] = {}
        self._demand_epoch: dict[str, int] = {}
        """Artifact key -> the pass in which its pending demand (up to `evict_demand_cap`) last changed."""
        self._moved: set[str] = set()
        """Artifact keys whose holders or demand changed in this pass."""
        self._fleet_epoch = 0
        """The last pass in which any agent, or any demand, changed."""
        self._last_seq: list[tuple[str, tuple[tuple[str, str, float], ...]]] = []
        """The jobs of the last pass in order, with what each did to the fleet."""
        self._last_pos: dict[str, int] = {}
        self._links: tuple[float, float] = (0.0, 0.0)
        self._dirty: set[str] = set()
        """Agents that may differ, at the current point of this pass, from the same point of the
        last one: a new view, or a job before this point that did something else to them."""

    # -- the queue's memory

    def forget(self, job_keys: Iterable[str]) -> None:
        """Drop what is remembered of jobs that are no longer pending (deleted, bound elsewhere)."""
        for key in job_keys:
            self._entries.pop(key, None)
            self._promises.pop(key, None)

    def retain(self, job_keys: Iterable[str] | Mapping[str, object]) -> None:
        """Keep only what is remembered of `job_keys` (the pending jobs)."""
        keep = job_keys if isinstance(job_keys, Mapping) else set(job_keys)
        for store in (self._entries, self._promises):
            for key in [k for k in store if k not in keep]:
                del store[key]

    @property
    def remembered(self) -> int:
        return len(self._entries)

    def promise(self, job_key: str) -> Promise | None:
        """The start `job_key` was promised, if it waits for a busy agent."""
        return self._promises.get(job_key)

    # -- one pass

    def plan(
        self,
        jobs: Iterable[JobView],
        agents: Iterable[AgentView],
        artifacts: Mapping[str, ArtifactInfo] | Iterable[ArtifactInfo],
        *,
        now: float,
        jobs_sorted: bool = False,
        demand: Mapping[str, int] | None = None,
    ) -> PlacementPlan:
        """One pass: the plan `placement.plan_placement` would make with the same arguments
        (and a `FleetIndex` kept between calls), reusing what earlier passes found unchanged."""
        s = self.settings
        sizes = artifacts if isinstance(artifacts, Mapping) else {a.key: a for a in artifacts}
        job_list: Iterable[JobView]
        if jobs_sorted:
            job_list = jobs
            if demand is None:
                demand = placement.count_demand(jobs) if isinstance(jobs, Sequence) else {}
        else:
            pending = jobs if isinstance(jobs, Sequence) else tuple(jobs)
            job_list = placement.in_queue_order(pending, s)
            if demand is None:
                demand = placement.count_demand(pending)
        agent_list = agents if isinstance(agents, Sequence) else tuple(agents)
        self._pass += 1
        self.stats.passes += 1
        self._note_changes(agent_list, sizes, demand)
        fleet = placement.open_pass(agent_list, sizes, now=now, demand=demand, settings=s, index=self.index)
        self._links = (fleet.max_dl, fleet.max_d2g)
        observer = _Observer(fleet)
        last_seq, last_pos, ptr = self._last_seq, self._last_pos, 0
        seq: list[tuple[str, tuple[tuple[str, str, float], ...]]] = []
        dirty = self._dirty
        bindings: list[Binding] = []
        waiting: list[Waiting] = []
        unplaceable: list[Unplaceable] = []
        examined = 0
        seen: set[str] = set()
        for job in job_list if fleet.free_total > 0 else ():
            if job.key in seen:
                raise PlacementError(f"job {job.key!r} appears twice in one placement pass; pass each pending job once")
            seen.add(job.key)
            examined += 1
            # Jobs of the last pass that are not here (bound, gone) did something this pass does not.
            old_at = last_pos.get(job.key)
            if old_at is not None and old_at >= ptr:
                for _, gone in last_seq[ptr:old_at]:
                    dirty.update(name for name, _, _ in gone)
                ptr = old_at + 1
                before = last_seq[old_at][1]
            else:
                before = None
            outcome, effects = self._place(fleet, observer, job, now)
            if effects != before:
                dirty.update(name for name, _, _ in effects)
                if before:
                    dirty.update(name for name, _, _ in before)
            seq.append((job.key, effects))
            if isinstance(outcome, Binding):
                bindings.append(outcome)
            elif isinstance(outcome, Waiting):
                waiting.append(outcome)
            else:
                unplaceable.append(outcome)
            if fleet.free_total <= 0:
                break
        self._last_seq, self._last_pos = seq, {key: i for i, (key, _) in enumerate(seq)}
        return PlacementPlan(tuple(bindings), tuple(waiting), tuple(unplaceable), examined)

    def _place(self, fleet: placement._Fleet, observer: _Observer, job: JobView, now: float
               ) -> tuple[Outcome, tuple[tuple[str, str, float], ...]]:
        promise = self._promises.get(job.key)
        overrun = 0.0
        if promise is not None and self.promise_settings is not None:
            overrun = self.promise_settings.broken_by(promise, now)
        entry = self._entries.get(job.key)
        if entry is not None and not overrun and (entry.job is job or entry.job == job) and self._holds(entry, fleet, job, now):
            fleet.replay(job.key, entry.effects)
            self.stats.reused += 1
            return entry.outcome, entry.effects
        placed = job
        if overrun:
            assert promise is not None
            placed = dataclasses.replace(job, overrun_s=overrun)
            self.stats.broken_promises += 1
        observer.reset()
        fleet.observer = observer
        try:
            outcome = fleet.place(placed, now=now)
        finally:
            fleet.observer = None
        self.stats.placed += 1
        effects = tuple(fleet.effects)
        if isinstance(outcome, Binding):
            self._entries.pop(job.key, None)
            self._promises.pop(job.key, None)
            return outcome, effects
        reads, runner_up = observer.finish(outcome.agent if isinstance(outcome, Waiting) else None)
        self._entries[job.key] = _Entry(
            job=job, outcome=outcome, effects=effects, pass_no=self._pass, now=now,
            victim_now=fleet.victim_now, aged=self._aged(job, now), links=self._links,
            reads=reads, keys=list(observer.keys.values()), fleet=observer.all_agents, cold_log=fleet.cold_log,
            free=observer.free, busy=observer.busy, busy_cut=observer.busy_cut, cold=observer.picked,
            truncated=observer.cut, runner_up=runner_up,
        )
        if isinstance(outcome, Waiting) and not outcome.reserved:
            if promise is None:
                self._promises[job.key] = Promise(outcome.agent, now, outcome.wait_s)
        else:
            self._promises.pop(job.key, None)
        return outcome, effects

    def _aged(self, job: JobView, now: float) -> bool:
        return now - job.created_at > self.settings.max_hot_wait_age_s

    # -- does a remembered placement still hold?

    def _holds(self, entry: _Entry, fleet: placement._Fleet, job: JobView, now: float) -> bool:
        """Whether placing the job again would give the remembered outcome (updating the entry
        where the outcome stays but what it rests on moved)."""
        if entry.aged != (now - job.created_at > self.settings.max_hot_wait_age_s) or entry.links != self._links:
            return False
        if entry.now != now and isinstance(entry.outcome, Waiting) and entry.outcome.reserved:
            return False  # its reason tells how long the job has been pending
        anywhere = (entry.victim_now != fleet.victim_now or self._fleet_epoch > entry.pass_no
                    or fleet.cold_log != entry.cold_log)
        if anywhere and entry.fleet:
            return False
        newcomers: list[str] = []
        if anywhere and entry.cold is not None:
            # The ranking of free agents may have moved: agents it offers now that it did not are
            # weighed below with those new to the job's artifacts (those it no longer offers lost).
            picked = fleet.cold_pick(job)
            if picked != entry.cold:
                if entry.winner() is None:
                    return False
                newcomers.extend(name for name in picked if name not in entry.cold)
                entry.cold = picked
            entry.cold_log = fleet.cold_log
        key_epoch = self._key_epoch
        any_gained = bool(fleet.gained)
        n = entry.pass_no
        checkpoint = job.artifact_keys[0]
        holders_moved = False
        for i, (key, gained, holders) in enumerate(entry.keys):
            now_gained = fleet.gained_of(key) if any_gained else ()
            if key_epoch.get(key, 0) <= n and now_gained == gained:
                continue
            if entry.winner() is None:
                return False
            current = frozenset(fleet.holder_names(key))
            newcomers.extend(current - holders)
            entry.keys[i] = (key, now_gained, current)
            holders_moved = holders_moved or key == checkpoint
        if n == self._pass - 1:
            # Validated in the last pass: only agents that may differ from then, and victims whose
            # demand or copies moved, need a closer look.
            dirty, moved, clock_moved = self._dirty, self._moved, entry.victim_now != fleet.victim_now
            changed = [read for read in entry.reads
                       if (read.name in dirty or (read.decays and clock_moved)
                           or (read.victim_keys and not moved.isdisjoint(read.victim_keys))
                           or (read.victim_gained or any_gained) and read.victim_keys)
                       and self._changed(entry, fleet, read)]
        else:
            changed = [read for read in entry.reads if self._changed(entry, fleet, read)]
        if entry.busy_cut is not None and (holders_moved or self._holder_changed(entry, checkpoint, changed)):
            # Which busy holders placement finds follows the order agents are indexed in, which moves
            # when one of them changes.
            if fleet.busy_candidates(job) != entry.busy_cut:
                return False
        if changed or newcomers:
            winner = entry.winner()
            views = fleet.views
            for read in changed:
                if read.name not in views or (read.deep and read.option is _FULL):
                    return False
            if winner is None:
                if not self._unchanged(entry, fleet, job, changed):
                    return False
            else:
                entrants = self._new_candidates(entry, fleet, job, changed, newcomers)
                if entrants is None or not self._still_wins(entry, fleet, job, winner, changed, [*newcomers, *entrants]):
                    return False
            for read in changed:  # the same as far as this job is concerned
                read.view, read.log = views[read.name], fleet.log_of(read.name)
        entry.victim_now = fleet.victim_now
        entry.pass_no = self._pass
        return True

    @staticmethod
    def _holder_changed(entry: _Entry, key: str, changed: list[_Read]) -> bool:
        holders = next((h for k, _, h in entry.keys if k == key), None)
        return holders is None or any(read.name in holders for read in changed)

    def _new_candidates(self, entry: _Entry, fleet: placement._Fleet, job: JobView, changed: list[_Read],
                        newcomers: list[str]) -> list[str] | None:
        """The free holders placing the job now would weigh that it did not (a holder that turned busy
        makes room under `holder_candidates` for one left out before); None when it would now leave
        out a busy holder of its checkpoint, as it did none before. Each agent that turned busy or
        free changed, or is new: below the cap, nothing else can move in or out."""
        cap = self.settings.holder_candidates
        moved = len(changed) + len(newcomers)
        if entry.busy + moved > cap:
            entry.busy = len(fleet.busy_candidates(job))
            if entry.busy > cap:
                return None
        if len(entry.free) < cap:
            return []  # every free holder was weighed: one that is new to them changed, or is new
        free = fleet.free_candidates(job)
        if free == entry.free:
            return []
        weighed = set(entry.free)
        entry.free = free
        return [name for name in free if name not in weighed]

    def _changed(self, entry: _Entry, fleet: placement._Fleet, read: _Read) -> bool:
        """Whether anything the placement read of this agent may have moved since."""
        if entry.pass_no != self._pass - 1 or read.name in self._dirty:
            # (Else the agent is as it was at this job's turn in the last pass, when the entry held.)
            if fleet.views.get(read.name) is not read.view or fleet.log_of(read.name) != read.log:
                return True
        if read.decays and entry.victim_now != fleet.victim_now:
            return True
        keys = read.victim_keys
        if not keys:
            return False
        if entry.pass_no == self._pass - 1:
            if not self._moved.isdisjoint(keys):
                return True
        else:
            n = entry.pass_no
            demand_epoch, key_epoch = self._demand_epoch, self._key_epoch
            if any(demand_epoch.get(k, 0) > n or key_epoch.get(k, 0) > n for k in keys):
                return True
        if fleet.gained or read.victim_gained:
            return any(fleet.gained_of(k) != read.victim_gained.get(k, ()) for k in keys)
        return False

    def _unchanged(self, entry: _Entry, fleet: placement._Fleet, job: JobView, changed: list[_Read]) -> bool:
        """Any change counts: every fact, and every option weighed, must be as before."""
        for read in changed:
            if not self._same_facts(fleet, read, job, waits=True):
                return False
            if read.deep and read.option is not _FLOORED:
                option = self._weigh(entry, fleet, job, read)
                if (None if option is None else option.signature()) != read.option:
                    return False
        return True

    def _still_wins(self, entry: _Entry, fleet: placement._Fleet, job: JobView, winner: _Read,
                    changed: list[_Read], newcomers: list[str]) -> bool:
        """The job waits for the cheapest option: it still does while that agent still holds its
        checkpoint with no free slot and costs less than anything else did, and every agent that
        changed, newly holds one of its artifacts or is newly a candidate, still costs strictly more."""
        assert isinstance(entry.outcome, Waiting)
        win_cost = entry.outcome.cost_s
        option = None
        if winner in changed:
            if not self._same_facts(fleet, winner, job, waits=False):
                return False
            option = self._weigh(entry, fleet, job, winner)
            if option is None or option.bind_s <= 0 or not option.cost_s < entry.runner_up:
                return False
            win_cost = option.cost_s
        for read in changed:
            if read is not winner and not self._loses(entry, fleet, job, read, win_cost):
                return False
        known = {read.name: read for read in entry.reads}
        for name in newcomers:
            if name not in fleet.views:
                continue
            read = known.get(name)
            if read is not None and read.deep:
                if read.option is _FULL:
                    return False
                continue  # weighed above if it changed; what it cost then bounds `runner_up`
            if read is None:
                read = known[name] = _Read(name, fleet.views[name], fleet.log_of(name))
                entry.reads.append(read)
            # Nothing weighed yet (or only its slot and tiers, as a holder of something else): any
            # change weighs it again.
            read.deep, read.option = True, _FLOORED
            if not self._loses(entry, fleet, job, read, win_cost):
                return False
        if option is not None:
            outcome, done_s = fleet.waiting_on(job, option)
            entry.outcome = outcome
            entry.effects = ((winner.name, "wait", done_s),)
            winner.option, winner.cost = option.signature(), option.cost_s
        return True

    @staticmethod
    def _same_facts(fleet: placement._Fleet, read: _Read, job: JobView, *, waits: bool) -> bool:
        """Whether the facts read of a changed agent (its free slot, its tiers; with `waits` its wait
        and its option's floor too) still hold."""
        name = read.name
        for (what, arg), value in read.facts.items():
            if what == "free":
                now_value: object = name in fleet.free_names
            elif what == "tier":
                now_value = fleet.tier_of(name, arg)
            elif not waits:
                continue
            elif what == "wait":
                now_value = fleet.wait_lower_bound(name)
            else:
                now_value = fleet.option_floor(job, name)
            if now_value != value:
                return False
        return True

    @staticmethod
    def _weigh(entry: _Entry, fleet: placement._Fleet, job: JobView, read: _Read) -> placement._Option | None:
        """The job's option on a changed agent as the pass stands; what weighing it reads becomes
        part of what the entry rests on."""
        sub = _Observer(fleet)
        fleet.observer = sub
        try:
            option = fleet.option_for(job, read.name)
        finally:
            fleet.observer = None
        new = sub.reads.get(read.name)
        if new is not None:
            read.victim_keys, read.victim_gained, read.decays = new.victim_keys, new.victim_gained, new.decays
        return option

    def _loses(self, entry: _Entry, fleet: placement._Fleet, job: JobView, read: _Read, win_cost: float) -> bool:
        """Whether a changed agent other than the one waited for still cannot beat it: its option
        (or, when only its slot and tiers were read and they stand, its wait; or its option's floor)
        costs strictly more than the winner's. Then it changes neither which option is cheapest nor
        whether the winner is weighed (placement skips only options that cannot beat the best)."""
        if not read.deep and self._same_facts(fleet, read, job, waits=False):
            if ("wait", "") not in read.facts:
                return True  # only its free slot and tiers were read, and they stand
            wait = fleet.wait_lower_bound(read.name)
            if wait > win_cost:
                entry.runner_up = min(entry.runner_up, wait)
                return True
        floor = fleet.option_floor(job, read.name)
        if floor is None:
            return True
        if floor > win_cost:  # even before what loading would evict
            entry.runner_up = min(entry.runner_up, floor)
            return True
        option = self._weigh(entry, fleet, job, read)
        if option is None:
            return True
        if option.cost_s > win_cost:
            entry.runner_up = min(entry.runner_up, option.cost_s)
            return True
        return False

    def _note_changes(self, agents: Sequence[AgentView], sizes: Mapping[str, ArtifactInfo],
                      demand: Mapping[str, int]) -> None:
        """Stamp the artifacts whose holders changed and those whose demand changed since the last pass."""
        n = self._pass
        moved: set[str] = set()
        if sizes is not self._sizes:
            if self._sizes is not None and sizes != self._sizes:
                self._entries.clear()  # artifact sizes feed every cost
            self._sizes = sizes
        old_views = self._views
        views: dict[str, AgentView] = {}
        key_epoch = self._key_epoch
        changed = False
        dirty: set[str] = set()
        self._dirty = dirty
        for v in agents:
            views[v.name] = v
            old = old_views.get(v.name)
            if old is not v:
                changed = True
                dirty.add(v.name)
                # Which agents hold a key: only a change of membership counts (tiers and waits are facts of
                # the agents, checked as such).
                if old is None or (old.ready, old.cordoned) != (v.ready, v.cordoned):
                    moved.update(v.keys if old is None else v.keys | old.keys)
                else:
                    moved.update(v.keys ^ old.keys)
        if len(views) != len(old_views) or changed:
            for name, old in old_views.items():
                if name not in views:
                    changed = True
                    dirty.add(name)
                    moved.update(old.keys)
        for key in moved:
            key_epoch[key] = n
        self._views = views
        cap = self.settings.evict_demand_cap
        capped = {k: min(c, cap) for k, c in demand.items() if c > 0}
        if capped != self._demand:
            changed = True
            epoch = self._demand_epoch
            old_demand = self._demand
            for key, c in capped.items():
                if old_demand.get(key) != c:
                    epoch[key] = n
                    moved.add(key)
            for key in old_demand:
                if key not in capped:
                    epoch[key] = n
                    moved.add(key)
            self._demand = capped
        self._moved = moved
        if changed:
            self._fleet_epoch = n
