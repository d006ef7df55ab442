"""Prices of nodes: live from each cloud's API, the last known good, the static table.

:mod:`.quotes` holds the pure part (what a quote is, the fallback chain, how the last known
good prices are kept); :mod:`.aws` and :mod:`.alibaba` ask the clouds; :mod:`.static` wraps
the table. A provider that cannot reach its API raises :class:`ProviderUnavailableError`; the
caller degrades to the next source with a warning, never a crash.
"""

from cheapspot_operator.pricing.quotes import (
    PriceKey,
    ProviderUnavailableError,
    Quote,
    resolve,
)

__all__ = ["PriceKey", "ProviderUnavailableError", "Quote", "resolve"]
