"""core.pricing's requote, as a property: a job whose references arrive as URLs ends at the price of the
same job sent inline, and never above what submit quoted and held (a key is never taken below zero)."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from fluxserve.core.models import MODELS, ModelSpec
from fluxserve.core.pricing import Quote, quote, requote
from fluxserve.core.sizes import MAX_FLUX2_PIXELS

MEGAPIXEL_PRICED = [spec for spec in MODELS.values() if spec.further_mp_price is not None]
sides = st.integers(min_value=64, max_value=2048).map(lambda side: side - side % 16)
outputs = st.tuples(sides, sides).filter(lambda size: size[0] * size[1] <= MAX_FLUX2_PIXELS)
references = st.lists(
    st.tuples(st.integers(1, 4096), st.integers(1, 4096), st.booleans()),  # (width, height, sent as a URL)
    min_size=1,
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(spec=st.sampled_from(MEGAPIXEL_PRICED), output=outputs, refs=references, output_known=st.booleans())
def test_a_url_reference_costs_what_the_same_image_inline_costs(
    spec: ModelSpec, output: tuple[int, int], refs: list[tuple[int, int, bool]], output_known: bool
) -> None:
    sizes = [(width, height) for width, height, _ in refs]
    inline = quote(spec, output, sizes)
    held = quote(spec, output if output_known else None, [None if url else (w, h) for w, h, url in refs])
    stored = Quote(held.cost, held.input_mp, held.output_mp)  # as the job row keeps it: 2-decimal MP
    fetched = requote(spec, stored, output, sizes)
    assert fetched.cost == inline.cost <= held.cost
    assert (fetched.input_mp, fetched.output_mp) == (inline.input_mp, inline.output_mp)


def test_the_issues_case_two_4mp_urls_at_64x1600_cost_the_inline_price() -> None:
    spec = MODELS["flux-2-max"]
    held = quote(spec, (64, 1600), [None, None])
    fetched = requote(spec, held, (64, 1600), [(2048, 2048), (2048, 2048)])
    assert held.cost == fetched.cost == quote(spec, (64, 1600), [(2048, 2048)] * 2).cost == Decimal(28)


def test_a_price_that_rose_since_the_quote_is_capped_at_the_quote() -> None:
    """A quote made under an older, lower price table (or any mistake upstream) is what the key pays."""
    spec = MODELS["flux-2-max"]
    low = Quote(Decimal(7), Decimal("4.19"), Decimal("0.10"))
    capped = requote(spec, low, (256, 256), [(2048, 2048)])
    assert capped.cost == Decimal(7) and capped.input_mp == Decimal("4.19")
