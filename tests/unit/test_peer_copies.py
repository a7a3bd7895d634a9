"""Which copies the fleet holds more than once (spec.duplicates), for agents in the peer tier."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.operator.peer_copies import plan_duplicates
from stoker.operator.placement import AgentView


def agent(name: str, disk: set[str], *, peers: bool = True, ready: bool = True,
          preloaded: set[str] = frozenset()) -> AgentView:  # type: ignore[assignment]
    return AgentView(name=name, disk=frozenset(disk | set(preloaded)), preloaded=frozenset(preloaded),
                     serves_peers=peers, ready=ready)


def test_a_copy_another_ready_agent_of_the_tier_holds_is_a_duplicate() -> None:
    plan = plan_duplicates([agent("a", {"m1", "m2"}), agent("b", {"m1"}), agent("c", {"m2"}, ready=False),
                            agent("d", {"m2"}, peers=False)])
    # m2's other copies are on an agent not Ready and one outside the tier: neither can give it back
    assert plan == {"a": frozenset({"m1"}), "b": frozenset({"m1"}), "c": frozenset()}


def test_baked_in_models_and_downloads_in_progress_are_left_out() -> None:
    a = AgentView(name="a", disk=frozenset({"base", "m"}), preloaded=frozenset({"base"}), serves_peers=True,
                  downloading={"x": 5})
    b = AgentView(name="b", disk=frozenset({"base", "m", "x"}), preloaded=frozenset({"base"}), serves_peers=True)
    assert plan_duplicates([a, b]) == {"a": frozenset({"m"}), "b": frozenset({"m"})}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.frozensets(st.sampled_from("abcdef"), max_size=4), st.booleans(), st.booleans()),
                max_size=8))
def test_every_duplicate_has_another_ready_holder_in_the_tier_and_no_last_copy_is_called_one(fleet) -> None:  # type: ignore[no-untyped-def]
    views = [agent(f"a{i}", set(disk), ready=ready, peers=peers) for i, (disk, ready, peers) in enumerate(fleet)]
    plan = plan_duplicates(views)
    for v in views:
        if not v.serves_peers:
            assert v.name not in plan
            continue
        for key in v.disk:
            others = [o for o in views if o is not v and o.serves_peers and o.ready and key in o.disk]
            assert (key in plan[v.name]) == (v.ready and bool(others))
