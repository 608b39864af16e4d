"""Every shipped model (data/models) reloads, matches its card's sha256 and config, and re-evaluates its card's
check metric to within 0.01 dB; every committed run is shipped or listed as not shipped, with a reason."""
import pytest

from causalir import experiments
from causalir.experiments import shipping

SHIPPED = shipping.shipped()


@pytest.mark.parametrize("key", sorted(SHIPPED))
def test_every_shipped_model_reloads_and_reaches_its_card(key):
    spec = SHIPPED[key]
    models = experiments.load_models(spec["experiment"], spec["profile"], spec["seed"])
    assert set(spec["models"]) <= set(models)
    diffs = shipping.verify(models, spec)
    assert all(d <= shipping.CHECK_TOL_DB for d in diffs.values())


def test_every_committed_run_is_shipped_or_says_why_not():
    runs = set(shipping.committed_results())
    shipped = {f"{s['experiment']}-{s['profile']}" for s in SHIPPED.values()}
    listed = set(shipping.NOT_SHIPPED)
    assert not (shipped & listed), f"shipped and still listed as not shipped: {sorted(shipped & listed)}"
    assert runs <= shipped | listed, f"committed runs neither shipped nor listed: {sorted(runs - shipped - listed)}"
    assert listed <= runs, f"NOT_SHIPPED names runs that are not committed: {sorted(listed - runs)}"
    assert all(len(why) > 20 for why in shipping.NOT_SHIPPED.values())


def test_shipped_models_stay_small():
    total = sum(s["total_bytes"] for s in SHIPPED.values())
    assert total < 30 * 2 ** 20, f"data/models holds {total / 2 ** 20:.1f} MiB (keep it well under 30 MiB)"
