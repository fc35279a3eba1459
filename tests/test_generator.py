"""The output head `generator`: its softcap bounds the logits before the log-softmax (Gemma 2's final logits)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from blockgraph.blocks.generator import Generator

torch.set_num_threads(1)


@pytest.mark.parametrize("output", ["logits", "log_softmax", "softmax"])
def test_softcapped_logits_are_cap_tanh_of_the_logits_before_the_output_function(output):
    capped = Generator(Generator.Params(d_model=6, vocab=11, output=output, softcap=2.0))
    plain = Generator(Generator.Params(d_model=6, vocab=11, output="logits"))
    plain.load_state_dict(capped.state_dict())
    x = torch.randn(3, 4, 6) * 10  # logits well beyond the cap
    with torch.no_grad():
        logits = plain(x)
        want = torch.tensor([[[2.0 * math.tanh(v / 2.0) for v in row] for row in rows] for rows in logits.tolist()])
        got = capped(x)
    if output == "log_softmax":
        want = F.log_softmax(want, dim=-1)
    elif output == "softmax":
        want = F.softmax(want, dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert logits.abs().max() > 2.0 and (output != "logits" or got.abs().max() < 2.0)


def test_a_softcap_must_be_positive():
    with pytest.raises(ValidationError, match="greater than 0"):
        Generator.Params(d_model=6, vocab=11, softcap=0.0)
