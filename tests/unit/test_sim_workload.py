"""Synthetic workloads and trace replay for the fleet simulator."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.sim import workload


def small_config(**changes: object) -> workload.WorkloadConfig:
    base = dict(n_models=50, n_loras=40, duration_s=600.0, rate_per_s=2.0, seed=3)
    base.update(changes)
    return workload.WorkloadConfig(**base)  # type: ignore[arg-type]


def test_zipf_sampler_draws_ranks_in_proportion_to_inverse_rank() -> None:
    sampler = workload.ZipfSampler(100, 1.0)
    rng = random.Random(7)
    counts = Counter(sampler.sample(rng) for _ in range(100_000))
    for rank in (0, 1, 4, 9):
        expected = sampler.probabilities[rank] * 100_000
        assert abs(counts[rank] - expected) < 0.06 * expected + 30
    assert counts[0] > counts[1] > counts[9]
    assert set(counts) <= set(range(100))


@given(n=st.integers(min_value=1, max_value=500), exponent=st.floats(min_value=0.0, max_value=2.0))
@settings(max_examples=50, deadline=None)
def test_zipf_probabilities_sum_to_one_and_never_increase_with_rank(n: int, exponent: float) -> None:
    probs = workload.ZipfSampler(n, exponent).probabilities
    assert abs(sum(probs) - 1.0) < 1e-9
    assert all(a >= b - 1e-15 for a, b in zip(probs, probs[1:]))


def test_the_same_seed_gives_the_same_trace_and_another_seed_a_different_one() -> None:
    first = workload.generate_trace(small_config())
    again = workload.generate_trace(small_config())
    other = workload.generate_trace(small_config(seed=4))
    assert first.jobs == again.jobs
    assert first.catalog == again.catalog
    assert first.jobs != other.jobs


def test_catalog_sizes_follow_the_public_model_files() -> None:
    catalog = workload.build_catalog(small_config(n_models=400, n_loras=400))
    for artifact in catalog.artifacts:
        if artifact.kind is workload.ArtifactKind.LORA:
            assert 10 * workload.MB <= artifact.size_bytes <= 400 * workload.MB
        elif artifact.family is workload.Family.SDXL:
            assert 6 * workload.GB <= artifact.size_bytes <= 7 * workload.GB
        else:
            assert 2 * workload.GB <= artifact.size_bytes <= 4.3 * workload.GB


def test_loras_in_a_job_belong_to_the_checkpoints_family() -> None:
    trace = workload.generate_trace(small_config())
    with_loras = [j for j in trace.jobs if j.loras]
    assert with_loras
    for job in with_loras:
        family = trace.catalog[job.model].family
        assert all(trace.catalog[name].family is family for name in job.loras)
        assert len(set(job.loras)) == len(job.loras)


def test_a_burst_gives_its_model_a_large_share_while_it_lasts() -> None:
    burst = workload.Burst(start_s=200.0, duration_s=200.0, rank=40, share=0.5)
    trace = workload.generate_trace(small_config(bursts=(burst,), rate_per_s=5.0))
    (start, end, model), = trace.bursts
    inside = [j for j in trace.jobs if start <= j.submit_s < end]
    outside = [j for j in trace.jobs if not start <= j.submit_s < end]
    share_in = sum(j.model == model for j in inside) / len(inside)
    share_out = sum(j.model == model for j in outside) / len(outside)
    assert share_in > 0.4
    assert share_out < 0.1


def test_arrivals_are_sorted_and_inside_the_duration() -> None:
    trace = workload.generate_trace(small_config())
    times = [j.submit_s for j in trace.jobs]
    assert times == sorted(times)
    assert 0 < times[0] and times[-1] < 600.0
    assert 900 < len(times) < 1500  # Poisson at 2/s over 600 s


def test_a_trace_written_as_csv_replays_to_the_same_jobs() -> None:
    trace = workload.generate_trace(small_config())
    text = workload.write_trace_csv(trace.jobs)
    replayed = workload.read_trace_csv(text.splitlines(), catalog=trace.catalog)
    assert [(j.model, j.loras) for j in replayed.jobs] == [(j.model, j.loras) for j in trace.jobs]
    assert all(abs(a.submit_s - b.submit_s) < 1e-3 for a, b in zip(replayed.jobs, trace.jobs))


def test_replay_sorts_rows_by_time_and_accepts_no_header() -> None:
    catalog = workload.build_catalog(small_config())
    lora = catalog.loras[0].name
    ckpt = next(c for c in catalog.checkpoints if c.family is catalog[lora].family).name
    trace = workload.read_trace_csv([f"5.0,{ckpt},{lora}", f"1.5,{ckpt},"], catalog=catalog)
    assert [j.submit_s for j in trace.jobs] == [1.5, 5.0]
    assert trace.jobs[1].loras == (lora,)
    assert [j.job_id for j in trace.jobs] == [0, 1]


def test_replay_refuses_a_model_missing_from_the_catalog() -> None:
    catalog = workload.build_catalog(small_config())
    with pytest.raises(workload.WorkloadError, match="not in the catalog"):
        workload.read_trace_csv(["time_s,model,loras", "1.0,no-such-model,"], catalog=catalog)


def test_replay_refuses_a_lora_given_as_the_model() -> None:
    catalog = workload.build_catalog(small_config())
    with pytest.raises(workload.WorkloadError, match="not a checkpoint"):
        workload.read_trace_csv([f"1.0,{catalog.loras[0].name},"], catalog=catalog)


# ---- a user's own catalog and trace (`stoker sim --catalog --trace`)

CATALOG = """\
name,kind,size,family,inference_s
juggernaut-xl,checkpoint,6.94GB,sdxl,
dreamshaper-8,checkpoint,2132625431,,
flux-dev,checkpoint,23.8GB,flux,31.5
detail-tweaker,lora,144MB,,
# a comment line, then a blank one

add-detail-xl,lora,0.2GiB,sdxl,
"""


def catalog() -> workload.Catalog:
    return workload.read_catalog_csv(CATALOG.splitlines())


def test_a_catalog_csv_gives_sizes_units_families_and_own_generation_times() -> None:
    cat = catalog()
    assert [a.name for a in cat.artifacts] == ["juggernaut-xl", "dreamshaper-8", "flux-dev", "detail-tweaker", "add-detail-xl"]
    assert cat["juggernaut-xl"].size_bytes == 6_940_000_000
    assert cat["dreamshaper-8"].size_bytes == 2_132_625_431
    assert cat["add-detail-xl"].size_bytes == int(0.2 * 2**30)
    # without a family, size decides between SD 1.5 and SDXL
    assert cat["dreamshaper-8"].family is workload.Family.SD15
    assert cat["flux-dev"].family is workload.Family.FLUX and cat["flux-dev"].inference_s == 31.5
    assert cat["juggernaut-xl"].inference_s is None
    assert [a.name for a in cat.loras] == ["detail-tweaker", "add-detail-xl"]


def test_a_catalog_written_as_csv_reads_back_the_same() -> None:
    cat = workload.build_catalog(small_config())
    assert workload.read_catalog_csv(workload.write_catalog_csv(cat).splitlines()).artifacts == cat.artifacts


@pytest.mark.parametrize(("text", "message"), [
    ("", "my.csv: no rows"),
    ("name,size\nm,1GB\n", "line 1: the header has no 'kind' column"),
    ("name,kind,size,colour\n", "line 1: unknown column 'colour'"),
    ("name,kind,size\nm,checkpoint,1GB\nm,checkpoint,2GB\n", "line 3: 'm' is already listed on line 2"),
    ("name,kind,size\n\nm,vae,1GB\n", "line 3: kind 'vae' of 'm' is not checkpoint or lora"),
    ("name,kind,size\nm,checkpoint,big\n", "line 2: size of 'm': 'big' is not a size"),
    ("name,kind,size\nm,checkpoint,0\n", "line 2: size of 'm' must be more than 0 bytes"),
    ("name,kind,size,family\nm,checkpoint,1GB,sd2\n", "line 2: family 'sd2' of 'm' is not one of"),
    ("name,kind,size,inference_s\nm,checkpoint,1GB,-3\n", "line 2: inference_s of 'm' is '-3'"),
    ("name,kind,size\nm,checkpoint,1GB,extra\n", "line 2: 4 cells but the header names 3 columns"),
    ("name,kind,size\n,checkpoint,1GB\n", "line 2: the name is empty"),
    ("name,kind,size\nl,lora,1GB\n", "no checkpoint rows"),
])
def test_a_bad_catalog_row_is_refused_with_its_line_and_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(workload.WorkloadError) as err:
        workload.read_catalog_csv(text.splitlines(), source="my.csv")
    assert message in str(err.value)
    assert str(err.value).startswith("my.csv")


def test_a_trace_of_timestamps_starts_at_its_earliest_request() -> None:
    trace = workload.read_trace_csv([
        "time_s,model,loras",
        "2024-05-01T12:00:05Z,juggernaut-xl,add-detail-xl",
        "2024-05-01T12:00:00Z,dreamshaper-8,detail-tweaker",
        "2024-05-01T12:01:00+00:00,flux-dev,",
    ], catalog=catalog())
    assert [(j.submit_s, j.model, j.loras) for j in trace.jobs] == [
        (0.0, "dreamshaper-8", ("detail-tweaker",)), (5.0, "juggernaut-xl", ("add-detail-xl",)), (60.0, "flux-dev", ())]
    assert trace.duration_s == 60.0


@pytest.mark.parametrize(("rows", "message"), [
    (["time_s,model,loras"], "trace: no requests"),
    (["time_s,model,loras", "1.0,juggernaut-xl,", "x,juggernaut-xl,"], "line 3: time 'x' is neither seconds nor"),
    (["-1,juggernaut-xl,"], "line 1: time '-1' is negative"),
    (["nan,juggernaut-xl,"], "line 1: time 'nan' is not a finite number"),
    (["1.0,juggernaut-xl,", "2024-05-01T12:00:00Z,juggernaut-xl,"], "line 2: the time is a timestamp but line 1 gave seconds"),
    (["1.0,sd-unknown,"], "line 1: 'sd-unknown' is not in the catalog; add a row for it"),
    (["1.0,juggernaut-xl,nope"], "line 1: 'nope' is not in the catalog"),
    (["1.0,detail-tweaker,"], "line 1: 'detail-tweaker' is a lora, not a checkpoint"),
    (["1.0,juggernaut-xl,dreamshaper-8"], "line 1: 'dreamshaper-8' in the loras column is a checkpoint"),
    (["1.0,juggernaut-xl,detail-tweaker,add-detail-xl"], "line 1: 4 cells; expected 'time_s,model,loras' with LoRAs separated by ';'"),
    (["1.0,juggernaut-xl,detail-tweaker;detail-tweaker"], "line 1: a LoRA is named twice"),
    (["1.0"], "line 1: expected 'time_s,model[,loras]'"),
])
def test_a_bad_trace_row_is_refused_with_its_line_and_what_to_fix(rows: list[str], message: str) -> None:
    with pytest.raises(workload.WorkloadError) as err:
        workload.read_trace_csv(rows, catalog=catalog())
    assert message in str(err.value)


def test_the_flat_catalog_mixes_four_families_with_a_quarter_of_12_to_24_gb_checkpoints() -> None:
    cat = workload.build_catalog(workload.WorkloadConfig(n_models=4000, n_loras=400, families=workload.FLAT_FAMILIES))
    ckpts = cat.checkpoints
    assert len(ckpts) == 4000 and len({a.name for a in cat.artifacts}) == 4400
    share = Counter(a.family for a in ckpts)
    for f in workload.FLAT_FAMILIES:
        assert abs(share[f.family] / 4000 - f.share) < 0.03
        sizes = [a.size_bytes for a in ckpts if a.family is f.family]
        assert f.size_bytes[0] <= min(sizes) and max(sizes) <= f.size_bytes[1]
    big = sum(a.size_bytes >= 12 * workload.GB for a in ckpts) / 4000
    assert 0.2 < big < 0.35
    assert max(a.size_bytes for a in cat.loras) <= 1300 * workload.MB
    # the default mix is untouched by the option
    assert workload.build_catalog(small_config()) == workload.build_catalog(small_config(families=None))
