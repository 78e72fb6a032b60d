"""Lathe API models (group lathe.dev, version v1alpha1)."""

from lathe.api.common import API_VERSION, GROUP, VERSION, Resource
from lathe.api.corpus import Corpus
from lathe.api.deployment import ModelDeployment
from lathe.api.finetune import FineTune
from lathe.api.pretrain import PretrainJob
from lathe.api.tokenizer import Tokenizer

KINDS: dict[str, type[Resource]] = {
    cls.kind_name: cls for cls in (Corpus, Tokenizer, PretrainJob, FineTune, ModelDeployment)
}

__all__ = [
    "API_VERSION", "GROUP", "VERSION", "KINDS", "Resource",
    "Corpus", "Tokenizer", "PretrainJob", "FineTune", "ModelDeployment",
]
