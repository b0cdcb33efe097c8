"""A norm given alone on a command line (``--model.norm brn`` without ``--model.norm_kwargs``):
it keeps the options of the config's norm that it takes and drops the others, for a fit and for
every run of a sweep alike."""

from __future__ import annotations

from jsonargparse import Namespace

from normbench.norms import NORMS, options_of


def norm_given_alone(argv: list[str]) -> bool:
    """Whether a command line sets ``--model.norm`` and not ``--model.norm_kwargs``: the norm
    replaces the config's, whose options may be another norm's."""

    def given(option: str) -> bool:
        return any(a == option or a.startswith((f"{option}=", f"{option}.")) for a in argv)

    return given("--model.norm") and not given("--model.norm_kwargs")


def keep_norm_options(argv: list[str], model: Namespace) -> list[str]:
    """Where ``argv`` gives the norm alone (``norm_given_alone``), drop from ``model.norm_kwargs``
    the options that ``model.norm`` does not take, as jsonargparse drops a class's ``init_args``
    when a later argument changes its ``class_path`` (``gn``'s ``num_groups`` when ``--model.norm
    brn`` follows a gn config; brn's ``eps`` stays). Returns the names dropped."""
    kwargs = dict(model.get("norm_kwargs") or {})
    if not norm_given_alone(argv) or model.get("norm") not in NORMS:
        return []  # the parser names an unknown norm itself
    options = options_of(model.norm)
    dropped = [k for k in kwargs if k not in options]
    if dropped:
        model.norm_kwargs = {k: v for k, v in kwargs.items() if k in options}
    return dropped
