"""A LensNet with a prior (``LensNetConfig.prior``): untrained, it scores exactly as the prior does
(both forwards); trained with the house loss on inputs that carry nothing but the prior, it keeps
the prior's order; its config refuses a feature set without the prior column."""

import numpy as np
import pytest
import torch

from lensnet.data import collate
from lensnet.losses import LensNetLoss
from lensnet.model import LensNet, LensNetConfig
from lensnet.train import LossConfig
from megacontext.tree import ConfigError
from tests.strategies import random_snapshot

F = 7  # entry features; the last is the prior


def _batch(ns=(6, 11, 4), d=8, seed=0, gain=0.3):
    """Random snapshots whose last entry feature is a prior in [-1, 1] and whose target utility is
    ``gain`` x that prior on legal actions: nothing else in the inputs says anything."""
    rng = np.random.default_rng(seed)
    snaps = []
    for n in ns:
        s = random_snapshot(rng, n=n, d_model=d, learnable=False)
        prior = rng.uniform(-1, 1, n)
        s["entry_features"] = np.concatenate(
            [rng.normal(size=(n, F - 1)), prior[:, None]], axis=1
        ).astype(np.float32)
        target = np.where(s["action_mask"], gain * prior, 0.0)
        s |= {"target_utilities": target, "expand_gain": np.clip(target, 0, None),
              "collapse_cost": np.clip(-target, 0, None)}
        snaps.append(s)
    return collate(snaps)


def _config(d=8, prior="bm25", **kw):
    return LensNetConfig.tiny(d, block_size=4, n_entry_features=F, feature_set="prior-lexical",
                              prior=prior, **kw)


def test_an_untrained_prior_lensnet_scores_exactly_as_its_prior():
    torch.manual_seed(0)
    model = LensNet(_config()).eval()
    batch = _batch()
    valid = batch["valid_mask"].bool()
    prior = torch.where(valid, batch["entry_features"][..., -1], 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), prior, atol=0, rtol=0)
        torch.testing.assert_close(model.reference_forward(batch), prior, atol=1e-6, rtol=0)
        # the check can fail: a network read-out that is not zero adds to the prior
        torch.nn.init.normal_(model.head.weight)
        assert not torch.allclose(model(batch)[valid], prior[valid], atol=1e-3)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("prior", ["bm25", ""])
def test_trained_on_uninformative_inputs_it_keeps_the_prior_order(prior):
    """The house loss on targets that are the prior scaled: the prior LensNet's scores keep the
    prior's order over the legal actions of fresh snapshots all through training (Spearman > 0.9;
    the gain stays positive). Without the prior path (the same column as one more feature) the
    model starts blind to it and has to learn it through its feature read-out."""
    torch.manual_seed(0)
    model = LensNet(_config(prior=prior))
    loss_fn = LensNetLoss.from_config(LossConfig(), max_level=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fresh = _batch(ns=(9, 12), seed=99)
    valid = fresh["valid_mask"].bool() & fresh["action_mask"].bool()  # the entries that can act

    def order() -> float:
        with torch.no_grad():
            u = model.eval()(fresh)[valid].numpy()
        model.train()
        return _spearman(u, fresh["entry_features"][..., -1][valid].numpy())

    orders = [order()]
    for step in range(120):
        batch = _batch(seed=step)
        loss = loss_fn(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 39:
            orders.append(order())
    if prior:  # the prior's order from the start, and kept (the residual fits a little noise)
        assert orders[0] == pytest.approx(1.0) and min(orders) > 0.9
        assert float(model.prior_gain.detach()) > 0
    else:  # learnt from nothing
        assert abs(orders[0]) < 0.5 and orders[-1] > 0.8


def test_prior_config_errors():
    with pytest.raises(ConfigError, match="prior must be"):
        _config(prior="attention")
    with pytest.raises(ConfigError, match="reads the 'prior-lexical' entry features"):
        LensNetConfig.tiny(8, n_entry_features=F, feature_set="relative-lexical", prior="bm25")
    with pytest.raises(ConfigError, match="reads the 'prior-lexical' entry features"):
        LensNetConfig.tiny(8, feature_set="prior-lexical", prior="bm25")
