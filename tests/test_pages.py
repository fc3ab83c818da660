"""The page owner both roles count KV pages with (pipeline/pages.py): no model needed."""

from __future__ import annotations

import grpc
import pytest

from pipeline.pages import SPARE_PAGES, PageBudget, PagesExhausted, pages_for, whole_pages
from pipeline.prefix_cache import PrefixCache

PAGE = 16


def test_a_partly_filled_last_page_counts_as_a_page():
    assert [pages_for(n, PAGE) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_a_fork_shares_only_the_whole_pages_before_it():
    assert [whole_pages(n, PAGE) for n in (0, 15, 16, 31, 32)] == [0, 0, 1, 1, 2]


def test_the_spare_page_is_never_promised():
    budget = PageBudget(10, PAGE)
    assert budget.total_pages == budget.free() == 10 - SPARE_PAGES


def test_a_sequence_needs_its_pages_less_those_it_shares():
    budget = PageBudget(10, PAGE)
    assert budget.new_pages(40) == 3
    assert budget.new_pages(40, shared_pages=2) == 1


def test_reservations_hold_pages_until_released():
    budget = PageBudget(10, PAGE)
    budget.reserve("a", 4)
    budget.reserve("b", 3)
    assert (budget.reserved(), budget.free()) == (7, 2)
    assert budget.release("a") == 4
    assert budget.free() == 6
    assert budget.release("a") == 0  # releasing twice frees nothing more


def test_a_reservation_beyond_the_free_pages_is_refused_and_holds_nothing():
    budget = PageBudget(10, PAGE)
    budget.reserve("a", 8)
    with pytest.raises(PagesExhausted) as refused:
        budget.reserve("b", 2)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.needed, refused.value.free) == (2, 1)
    assert "needs 2 KV pages but only 1 are free" in refused.value.message
    assert budget.free() == 1


def test_cached_pages_count_against_reservations():
    held = [3]
    budget = PageBudget(10, PAGE, cached_pages=lambda: held[0])
    assert budget.free() == 6
    assert budget.shortfall(8) == 2  # evict this many cached pages first
    held[0] = 0
    assert budget.shortfall(8) == 0


def test_a_live_cache_must_keep_the_spare_free_too():
    budget = PageBudget(10, PAGE)
    assert budget.missing(available=5, pages=4) == 0
    assert budget.missing(available=5, pages=5) == 1
    assert budget.missing(available=0, pages=0) == SPARE_PAGES


def test_the_prefix_cache_counts_pages_the_same_way():
    cache = PrefixCache(PAGE)
    budget = PageBudget(100, PAGE, cached_pages=cache.held_pages)
    tokens = list(range(40))
    cache.start(1)
    cache.finish(1, tokens)  # cached: 40 tokens on 3 pages
    assert budget.free() == budget.total_pages - pages_for(40, PAGE)
    hit = cache.lookup(tokens + [99])
    assert (hit.tokens, hit.shared_pages) == (40, whole_pages(40, PAGE))
    # The fork of 41 tokens (plus 8 to generate) takes what it does not share.
    assert budget.new_pages(49, hit.shared_pages) == 4 - 2
