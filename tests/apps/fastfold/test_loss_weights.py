"""AF2's loss weights (Suppl. 1.9, eq. 7): the model config's values, zero accepted for every term
(fine-tuning switches terms on and off), a negative weight refused naming its field."""

import dataclasses

import pytest

from ferryman.apps.fastfold.loss import LossWeights


def test_the_defaults_are_af2_initial_training_weights():
    assert dataclasses.asdict(LossWeights()) == {
        "backbone_fape": 0.5, "sidechain_fape": 0.5, "supervised_chi": 1.0, "distogram": 0.3, "masked_msa": 2.0,
        "plddt": 0.01, "experimentally_resolved": 0.0, "violation": 0.0, "tm": 0.0}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(LossWeights)])
def test_every_weight_may_be_zero_and_none_negative(name):
    assert getattr(LossWeights(**{name: 0.0}), name) == 0.0
    with pytest.raises(ValueError) as err:
        LossWeights(**{name: -0.25})
    assert str(err.value) == f"loss weight {name} must be >= 0, got -0.25"
