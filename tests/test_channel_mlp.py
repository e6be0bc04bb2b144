"""SE, CBAM and BAM share one channel MLP (issue 14 item 1), with the same numbers and state-dict keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medseg.nn.registries import create_block_attention


def test_se_cbam_and_bam_share_one_channel_mlp_with_the_same_numbers():
    from medseg.nn.bam import BAM
    from medseg.nn.cbam import CBAM
    from medseg.nn.channel import ChannelMLP
    from medseg.nn.layers import spatial_mean

    torch.manual_seed(0)
    se, cbam, bam = (create_block_attention(n, 32, reduction=4) for n in ("se", "cbam", "bam"))
    assert isinstance(se, ChannelMLP) and isinstance(cbam, CBAM) and isinstance(bam, BAM)
    mlps = [se, cbam.channel_gate, bam]
    assert all(isinstance(m, ChannelMLP) for m in mlps)
    x = torch.randn(2, 32, 5, 4, 3)
    v = spatial_mean(x)
    for m in mlps:  # the state-dict keys stay fc1 / fc2 (old checkpoints load) and the MLP is W2 relu(W1 v)
        assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} <= set(m.state_dict())
        assert m.fc1.out_channels == 8
        w1, b1, w2, b2 = m.fc1.weight.flatten(1), m.fc1.bias, m.fc2.weight.flatten(1), m.fc2.bias
        ref = F.linear(F.relu(F.linear(v.flatten(1), w1, b1)), w2, b2)
        torch.testing.assert_close(m.mlp(v).flatten(1), ref)
    torch.testing.assert_close(se(x), x * torch.sigmoid(se.mlp(v)))
