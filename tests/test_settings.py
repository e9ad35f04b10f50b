"""Settings: one definition per flag (its default, type and help on its field), and what checkpoints record."""

import dataclasses
import json
import os

import pytest

from megatron_glm.config import ModelConfig
from megatron_glm.flags import UNSET, Flag, dest, flag_of, flagged_fields
from megatron_glm.settings import SECTIONS, Settings, recorded
from megatron_glm.training.arguments import build_parser
from megatron_glm.training.dry_run import DryRunConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "meta_4457239.json")


def pretrain_actions() -> dict:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def expected_parser_default(field, spec: Flag):
    if spec.negate:  # --no-load-optim: off by default, the field (load_optim) on
        assert field.default is True, f"{field.name}: a negated switch's field defaults to True"
        return False
    if spec.parser_default is not UNSET:
        return spec.parser_default
    return list(field.default) if isinstance(field.default, tuple) else field.default


def test_every_flag_is_one_field_and_its_default_is_the_fields():
    """A flag's default lives on its field alone: the parser's default is the field's (or the declared stand-in
    that a preset or the layout fills in), and no flag of glm-pretrain is declared outside the sections."""
    actions, seen = pretrain_actions(), {"preset"}
    # the dry run's flags are glm-pretrain's too, outside the job's settings (a checkpoint never records them)
    for name, section in {**SECTIONS, "dry_run": DryRunConfig}.items():
        for field, spec, _ in flagged_fields(section):
            action = actions[dest(field)]
            assert dest(field) not in seen, f"{dest(field)} is declared by two sections"
            seen.add(dest(field))
            if not spec.required:
                assert action.default == expected_parser_default(field, spec), (
                    name,
                    field.name,
                    action.default,
                )
            assert (action.help is None) == (spec.help is None) or spec.hidden, (name, field.name)
    assert set(actions) == seen, (
        f"flags declared outside the settings: {sorted(set(actions) - seen)}"
    )


def test_the_field_defaults_are_what_the_flags_give():
    """Parsing no optional flag gives every section its field defaults (the sizes: the preset-less defaults)."""
    args = build_parser().parse_args(["--data-path", "x"])
    settings = Settings.from_flags(args)
    for name, section in SECTIONS.items():
        got = getattr(settings, name)
        for field in dataclasses.fields(section):
            if name == "model" and field.name == "max_position_embeddings":
                # no preset: the sequence's length
                assert got.max_position_embeddings == settings.data.seq_length
            elif name == "model" and field.name == "ffn_hidden_size":
                assert got.ffn_hidden_size == 4 * got.hidden_size
            elif name in ("objective",) and field.name in ("seq_length", "seed"):
                continue  # the data's and the job's
            elif flag_of(field) is not None and not flag_of(field).required:
                assert getattr(got, field.name) == field.default, (name, field.name)


def test_a_switch_without_its_negation_keeps_megatrons_attribute():
    args = build_parser().parse_args(
        [
            "--data-path",
            "x",
            "--train-iters",
            "1",
            "--no-load-optim",
            "--load",
            "c",
            "--no-shuffle-blocks",
        ]
    )
    # Megatron's and THUDM's names
    assert args.no_load_optim is True and args.no_shuffle_blocks is True
    settings = Settings.from_flags(args)
    assert settings.checkpoint.load_optim is False and settings.objective.shuffle_spans is False


def test_glm_plan_takes_glm_pretrains_model_flags():
    from megatron_glm.plan.cli import build_parser as plan_parser

    ours = {a.dest: a.default for a in plan_parser()._actions}
    for field, _, _ in flagged_fields(ModelConfig):
        assert dest(field) in ours and ours[dest(field)] == pretrain_actions()[dest(field)].default


def test_settings_round_trip_through_a_checkpoint_record():
    args = build_parser().parse_args(
        [
            "--data-path",
            "0.3",
            "a",
            "0.7",
            "b",
            "--train-iters",
            "5",
            "--zero-stage",
            "1",
            "--bert-prob",
            "0.4",
            "--rampup-batch-size",
            "2",
            "2",
            "8",
            "--no-load-rng",
            "--load",
            "c",
            "--pipeline-layers",
            "1",
            "1",
            "--eval-tasks",
            "choice:x.jsonl",
        ]
    )
    settings = Settings.from_flags(args)
    meta = json.loads(
        json.dumps({"model": settings.model.to_dict(), "settings": settings.record()})
    )
    assert recorded(meta) == settings


def test_a_checkpoint_of_the_previous_format_reads_back_its_settings():
    """meta.json before the settings existed recorded the raw flags (``args``); they read back as the sections."""
    with open(FIXTURE) as f:
        meta = json.load(f)
    settings = recorded(meta)
    assert settings.parallel.zero_stage == 1 and settings.checkpoint.load_optim is False
    assert settings.objective.token_prob == 0.5 and settings.objective.sentence_prob == 0.3
    assert settings.objective.shuffle_spans is False and settings.objective.packed is True
    assert settings.objective.seq_length == 64 and settings.data.split == "90,10,0"
    assert (
        settings.data.data_path == ("/data/docs_text_document",) and settings.training.seed == 1234
    )
    assert settings.model.layernorm_epsilon == 1e-6 and settings.model.init_method_std == 0.01
    assert settings.model == ModelConfig.from_dict(meta["model"])


def test_a_record_from_a_newer_version_keeps_what_it_knows():
    settings = Settings.from_flags(
        build_parser().parse_args(["--data-path", "x", "--train-iters", "1"])
    )
    record = settings.record()
    record["parallel"]["some_future_setting"] = 3
    record["brand_new_section"] = {"x": 1}
    assert recorded({"model": settings.model.to_dict(), "settings": record}) == settings


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_is_keyword_only(section):
    cls = SECTIONS[section]
    with pytest.raises(TypeError):
        cls(*[1] * len(dataclasses.fields(cls)))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--decoder-first-pipeline-num-layers", "2"], "need --pipeline-model-parallel-size > 1"),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-layers", "1", "3"]
            + ["--decoder-first-pipeline-num-layers", "1"],
            "--pipeline-layers gives every stage's layers",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
            + ["--account-for-embedding-in-pipeline-split"],
            "give the interleaving as --num-virtual-stages-per-pipeline-rank",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
            + ["--num-virtual-stages-per-pipeline-rank", "2"],
            "both set the interleaving: pass one",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"],
            "--num-layers + the embedding = 5 does not split evenly into --pipeline-model-parallel-size 2",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]
            + ["--decoder-last-pipeline-num-layers", "1"],
            "leaves 2 layers for the 0 stage(s) between",
        ),
    ],
)
def test_an_uneven_pipeline_split_that_cannot_work_is_refused_before_any_work(flags, message):
    import re

    from megatron_glm.training.config import from_args

    argv = [
        "--data-path",
        "x",
        "--train-iters",
        "1",
        "--num-layers",
        "4",
        "--device",
        "cpu",
        *flags,
    ]
    world = 2 if "--pipeline-model-parallel-size" in flags else 1
    with pytest.raises(ValueError, match=re.escape(message)):
        from_args(build_parser().parse_args(argv), world)
