"""The data files and directories a stage resolves, as its manifest records them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe_trainer import stage
from lathe_trainer.stage import StageConfig, combined_digest, digest_outputs, sha256_file


def config_for(data_dir, output: str) -> StageConfig:
    return StageConfig(kind="FineTune", name="ner", namespace="ml",
                       stage_key="sha256:" + "ab" * 32, spec={}, output_uri=output,
                       data_dir=str(data_dir))


def test_files_and_directories_digested(tmp_path):
    (tmp_path / "conll").mkdir()
    (tmp_path / "conll" / "train.tsv").write_text("Aspirin\tO\n")
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "manifest.json").write_text("{}")
    config = config_for(tmp_path, f"file://{tmp_path}/out")
    stage.resolve_data_path(config, "conll/train.tsv")
    stage.resolve_data_path(config, str(model))
    stage.resolve_data_path(config, "conll/missing.tsv")

    digests = stage.data_digests(config)

    assert digests == {
        "conll/train.tsv": sha256_file(tmp_path / "conll" / "train.tsv"),
        # The digest a stage output gets, without its manifest.
        str(model): combined_digest({"config.json": sha256_file(model / "config.json")}),
    }
    assert digests[str(model)] == combined_digest(digest_outputs(model))


def test_digests_kept_per_output(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    first = config_for(tmp_path, f"file://{tmp_path}/first")
    second = config_for(tmp_path, f"file://{tmp_path}/second")
    stage.resolve_data_path(first, "a.txt")
    assert stage.data_digests(first) == {"a.txt": sha256_file(tmp_path / "a.txt")}
    assert stage.data_digests(second) == {}


def test_run_records_left_out_of_digest(tmp_path):
    """Two runs that write the same model share a digest even though their run records (speed,
    resume step) differ; a changed model changes it."""

    def finish(name: str, weights: str, seconds: float) -> dict:
        output = tmp_path / name
        (output / "model").mkdir(parents=True)
        (output / "model" / "weights.bin").write_text(weights)
        (output / "report.json").write_text(f'{{"trainSeconds": {seconds}}}')
        config = config_for(tmp_path, f"file://{output}")
        return stage.write_manifest(config, {}, run_records=("report.json",))

    first = finish("first", "w1", 10.0)
    again = finish("again", "w1", 12.5)
    changed = finish("changed", "w2", 10.0)

    assert first["digest"] == again["digest"]
    assert first["digest"] != changed["digest"]
    assert first["outputs"]["report.json"] != again["outputs"]["report.json"]
    assert first["runRecords"] == ["report.json"]


def _finetune_spec(tmp_path, test_lines: str, **extra):
    import yaml

    from lathe.api.finetune import FineTuneSpec

    example = Path(__file__).resolve().parents[2] / "examples" / "pubmed" / "04-finetune.yaml"
    spec = yaml.safe_load(example.read_text())["spec"]
    (tmp_path / "train.tsv").write_text("Breast\tB-Disease\ncancer\tI-Disease\n.\tO\n")
    (tmp_path / "test.tsv").write_text(test_lines)
    spec["data"] = {"format": "conll", "train": "train.tsv", "test": "test.tsv"}
    return FineTuneSpec.model_validate({**spec, **extra})


def test_test_type_missing_from_train(tmp_path):
    from lathe_trainer.finetune.stage import read_splits

    config = config_for(tmp_path, f"file://{tmp_path}/out")
    spec = _finetune_spec(tmp_path, "Gout\tB-Disease\n.\tO\n\nAspirin\tB-Diseas\n.\tO\n")
    with pytest.raises(stage.StageError) as raised:
        read_splits(config, spec)
    message = str(raised.value)
    assert "spec.data.test:" in message
    assert "sentence 2 of 'test.tsv' has the entity type 'Diseas'" in message
    assert "fix the tag" in message
    assert "maxTrainSentences" not in message


def test_train_types_cover_test(tmp_path):
    from lathe_trainer.finetune.stage import read_splits

    config = config_for(tmp_path, f"file://{tmp_path}/out")
    spec = _finetune_spec(tmp_path, "Gout\tB-Disease\n.\tO\n", maxTrainSentences=1)
    assert set(read_splits(config, spec)) == {"train", "test"}
