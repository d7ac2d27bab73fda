"""Design space: HAT compatibility (params, FLOPs, YAML), validation errors, evolution operators."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hat_edge.space import (
    PRESETS,
    TRANSFORMER_BASE,
    TRANSFORMER_BIG,
    Arch,
    SearchSpace,
    SpaceError,
    get_space,
    n_ende_layers,
)

from shared_data import HAT_DATA as SHARED  # noqa: E402
SUBTRANSFORMERS = SHARED / "configs" / "wmt14.en-de" / "subtransformer"


def _published() -> dict[str, tuple[float, float]]:
    """HAT's published #Params (M) and FLOPs (G) per config, from the shared README table."""
    rows = {}
    for line in (SHARED / "README.md").read_text().splitlines():
        m = re.match(r"\| (HAT_\S+) \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


PUBLISHED = _published()


def test_shared_table_has_all_17_configs() -> None:
    assert len(PUBLISHED) == 17
    assert {p.stem for p in SUBTRANSFORMERS.glob("HAT_*.yml")} == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_flops_match_hat(name: str) -> None:
    arch = Arch.load(SUBTRANSFORMERS / f"{name}.yml")
    PRESETS["hat-wmt"].validate(arch)
    params_m, flops_g = PUBLISHED[name]
    assert abs(arch.params() / 1e6 - params_m) / params_m <= 0.005
    assert abs(arch.flops() / 1e9 - flops_g) / flops_g <= 0.01


@pytest.mark.parametrize("path", sorted(SUBTRANSFORMERS.glob("HAT_*.yml")), ids=lambda p: p.stem)
def test_hat_yaml_round_trip(path: Path, tmp_path: Path) -> None:
    arch = Arch.load(path)
    out = arch.save(tmp_path / "a.yml")
    theirs = yaml.safe_load(path.read_text())
    ours = yaml.safe_load(out.read_text())
    # every *-subtransformer key HAT wrote comes back with the same value
    for k, v in theirs.items():
        if k.endswith("-subtransformer"):
            assert ours[k] == v, k
    assert Arch.load(out) == arch
    # and hat-edge's own JSON format too
    assert Arch.load(arch.save(tmp_path / "a.json")) == arch


def test_hat_space_yaml_reads_as_preset() -> None:
    space0 = SearchSpace.load(SHARED / "configs" / "wmt14.en-de" / "supertransformer" / "space0.yml")
    space1 = SearchSpace.load(SHARED / "configs" / "iwslt14.de-en" / "supertransformer" / "space1.yml")
    for ours, theirs in ((PRESETS["hat-wmt"], space0), (PRESETS["hat-iwslt"], space1)):
        for f in ("encoder_embed_choice", "decoder_ffn_embed_dim_choice", "decoder_layer_num_choice",
                  "decoder_ende_attention_heads_choice", "decoder_arbitrary_ende_attn_choice", "qkv_dim"):
            assert getattr(ours, f) == getattr(theirs, f), f


def test_own_space_format_round_trip(tmp_path: Path) -> None:
    for space in PRESETS.values():
        for suffix in (".yml", ".json"):
            loaded = SearchSpace.load(space.save(tmp_path / f"s{suffix}"))
            assert loaded == space


def test_features_are_hats_ten() -> None:
    # first row of HAT's Xeon CSV: decoder 1 layer attending to the last 3 encoder layers -> 3.0
    a = Arch.load(SUBTRANSFORMERS / "HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.yml")
    f = a.features()
    assert len(f) == 10
    assert f[0] == 512 and f[1] == 6 and f[5] == 5
    assert f[9] == pytest.approx((1 + 2 + 2 + 2 + 1) / 5)  # [-1, 1, 1, 1, -1] -> layers 1,2,2,2,1
    assert [n_ende_layers(c) for c in (-1, 1, 2)] == [1, 2, 3]


def test_feature_range_matches_hat_csv() -> None:
    """Features of sampled archs span the same range as HAT's measured CSV rows."""
    import csv

    with open(SHARED / "latency" / "wmt14ende_cpu_xeon_all.csv") as fh:
        rows = list(csv.DictReader(fh))
    ende = {float(r["decoder_arbitrary_ende_attn_avg"]) for r in rows}
    ours = {a.features()[9] for a in PRESETS["hat-wmt"].sample_n(400, seed=1)}
    assert min(ende) == min(ours) == 1.0 and max(ende) == max(ours) == 3.0


def test_baselines() -> None:
    # Transformer-Base happens to be a point of HAT's space; Transformer-Big lies outside it.
    assert PRESETS["hat-wmt"].contains(TRANSFORMER_BASE)
    assert not PRESETS["hat-wmt"].contains(TRANSFORMER_BIG)
    # 6+6 layers without embeddings: 18.9M encoder + 25.2M decoder (Vaswani et al.'s 65M minus 21M embeddings)
    assert TRANSFORMER_BASE.params() == pytest.approx(44.1e6, rel=0.01)
    assert TRANSFORMER_BIG.params() == pytest.approx(4 * TRANSFORMER_BASE.params(), rel=0.01)


@pytest.mark.parametrize("space", list(PRESETS.values()), ids=lambda s: s.name)
def test_sampling_is_seeded_and_valid(space: SearchSpace) -> None:
    a = space.sample_n(30, seed=7)
    b = space.sample_n(30, seed=7)
    assert a == b and len(set(a)) == 30
    assert a != space.sample_n(30, seed=8)
    for arch in a:
        space.validate(arch)
    space.validate(space.largest())
    space.validate(space.smallest())
    assert space.smallest().params() < space.largest().params()


@pytest.mark.parametrize("space", list(PRESETS.values()), ids=lambda s: s.name)
def test_mutation_and_crossover_stay_in_space(space: SearchSpace) -> None:
    rng = random.Random(0)
    pop = space.sample_n(20, seed=3)
    changed = 0
    for i in range(200):
        m = space.mutate(pop[i % 20], rng, prob=0.3)
        space.validate(m)
        changed += m != pop[i % 20]
        c = space.crossover(pop[i % 20], pop[(i + 1) % 20], rng)
        space.validate(c)
    assert changed > 150  # with 30%-per-gene mutation nearly every child differs
    assert space.mutate(pop[0], rng, prob=0.0) == pop[0]


def test_crossover_mixes_parents() -> None:
    space = PRESETS["hat-wmt"]
    a, b = space.largest(), space.smallest()
    rng = random.Random(0)
    kids = [space.crossover(a, b, rng) for _ in range(50)]
    # each gene comes from a parent; with 50 kids both parents' values appear for the embed dim
    assert {k.encoder_embed_dim for k in kids} == {640, 512}
    for k in kids:
        assert set(k.encoder_ffn_embed_dim) <= {3072, 1024}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("encoder-embed-dim-subtransformer: 700\n", "allowed: [512, 640]"),
        ("encoder-embed-dim-subtransformer: '512'\n", "must be an integer"),
        ("decoder-arbitrary-ende-attn-all-subtransformer: [5]\n", "allowed: -1, 1, 2"),
        (None, "missing key 'decoder-layer-num-subtransformer'"),
    ],
)
def test_bad_yaml_one_line_error(text: str | None, needle: str, tmp_path: Path) -> None:
    good = (SUBTRANSFORMERS / "HAT_wmt14ende_xeon@137.9ms_bleu@25.8.yml").read_text()
    doc = yaml.safe_load(good)
    if text is None:
        del doc["decoder-layer-num-subtransformer"]
    else:
        doc.update(yaml.safe_load(text))
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpaceError) as e:
        PRESETS["hat-wmt"].validate(Arch.load(path), str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)
    # the CLI prints the same one line, no traceback, non-zero exit
    proc = subprocess.run([sys.executable, "-m", "hat_edge.cli", "arch", "info", str(path), "--space", "hat-wmt"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert needle in proc.stderr + proc.stdout


def test_out_of_space_names_field_and_choices() -> None:
    a = PRESETS["demo"].largest()
    with pytest.raises(SpaceError, match=r"field 'encoder_embed_dim' is 256, allowed: \[512, 640\]"):
        PRESETS["hat-wmt"].validate(Arch.from_dict(dict(a.to_dict(), qkv_dim=512)))


def test_cli_arch_info_json_reproduces_published_params() -> None:
    path = SUBTRANSFORMERS / "HAT_wmt14ende_raspberrypi@3.5s_bleu@25.8.yml"
    proc = subprocess.run([sys.executable, "-m", "hat_edge.cli", "arch", "info", str(path), "--json"],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert isinstance(out["params"], int) and isinstance(out["flops"], int)
    assert abs(out["params"] - 25.22e6) / 25.22e6 <= 0.005
    assert len(out["features"]) == 10 and out["validation"]["space"] == "hat-wmt"


def test_cli_space_sample_writes_files(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hat_edge.cli", "space", "sample", "demo", "-n", "4",
                           "--seed", "3", "--out-dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, check=True)
    listed = json.loads(proc.stdout)
    files = sorted(tmp_path.glob("*.yml"))
    assert len(files) == 4 == len(listed)
    assert [Arch.load(f) for f in files] == PRESETS["demo"].sample_n(4, seed=3)


def test_get_space_errors() -> None:
    assert get_space("demo") is PRESETS["demo"]
    with pytest.raises(SpaceError, match="unknown space 'nope'"):
        get_space("nope")
