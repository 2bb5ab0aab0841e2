"""Shared test setup: deterministic algorithms and a fixed seed per test, and the test tiers.

Tiers: `pytest -m "not slow"` is the fast tier (minutes): tests/unit, tests/parity and one
cheap representative of each multi-process module below, so every module still runs. Every
other test in tests/dist, tests/equivalence and tests/e2e (they start gloo ranks or whole
training runs) is marked `slow`, as are the unit tests marked by hand. CI runs every tier.
"""

import pytest
import torch

MULTI_PROCESS_DIRS = ("dist", "equivalence", "e2e")
# One cheap case per multi-process module that stays in the fast tier.
FAST_REPRESENTATIVES = {
    "tests/dist/test_bench_dispatch.py::test_expected_saving_matches_hand_worked_counts",
    "tests/dist/test_bytegrad_reduce.py::"
    "test_hierarchical_bytegrad_sum_is_identical_on_every_rank_and_close_to_exact",
    "tests/dist/test_comm.py::test_all_to_all_uneven_with_zero_splits_matches_local[2]",
    "tests/dist/test_context_parallel.py::test_cp_attention_exact[cp2-s12-gqa]",
    "tests/dist/test_dedup_dispatcher.py::test_dedup_matches_on_more_layouts[etp2-dropless-top4]",
    "tests/dist/test_dispatchers.py::test_dispatcher_matches_local_reference[ep2-dropless-alltoall]",
    "tests/dist/test_grad_buckets.py::"
    "test_buckets_launch_during_the_last_backward_and_are_counted_once[dp2]",
    "tests/dist/test_parameter_families.py::test_every_parameter_in_exactly_one_family[dp4]",
    "tests/dist/test_reshard.py::"
    "test_resume_under_another_layout_matches_single_process[dp1->dp2__ep2-allgather]",
    "tests/e2e/test_convert_memory.py::test_convert_from_hf_holds_a_fraction_of_the_model",
    "tests/e2e/test_checkpoint_safety.py::"
    "test_second_run_into_a_folder_in_use_stops_naming_the_holder",
    "tests/e2e/test_fault_tolerance.py::test_nonfinite_stop_saves_nothing_and_raises",
    "tests/e2e/test_prune_cli.py::test_prune_cli_rejects_bad_arguments",
    "tests/e2e/test_quick_tour.py::"
    "test_layout_error_suggests_only_values_that_pass_every_check[world6-ep3-experts]",
    "tests/e2e/test_train.py::test_metrics_row_has_required_fields",
    "tests/equivalence/test_distributed_optimizer.py::"
    "test_distributed_optimizer_matches_single_process[tp2-dp2__ep2]",
    "tests/equivalence/test_folding.py::test_folded_layout_matches_single_process[dp2__ep2]",
    "tests/equivalence/test_grad_compression.py::"
    "test_bytegrad_sends_packed_chunks_on_both_families[zero1]",
    "tests/equivalence/test_overlap.py::"
    "test_overlapped_reduction_matches_single_process[dp2-overlap]",
    "tests/equivalence/test_pipeline.py::test_pipeline_layout_matches_single_process[pp4-1f1b]",
    "tests/equivalence/test_recompute.py::"
    "test_recompute_on_folded_layout_matches_single_process[dp2__ep2-global_aux-moe]",
    "tests/equivalence/test_context.py::test_context_parallel_layout_matches_single_process[tp2-cp2]",
}


def pytest_collection_modifyitems(config, items):
    collected = set()
    for item in items:
        node = item.nodeid
        collected.add(node)
        in_multi_process_dir = node.split("/")[1] in MULTI_PROCESS_DIRS
        if in_multi_process_dir and node not in FAST_REPRESENTATIVES:
            item.add_marker(pytest.mark.slow)
    # A renamed representative would silently drop its module from the fast tier: checked
    # whenever the whole suite is collected.
    whole_suite = config.args in ([], ["tests"]) or config.args == [str(config.rootpath)]
    stale = FAST_REPRESENTATIVES - collected
    if whole_suite and not config.option.keyword and stale:
        raise pytest.UsageError(f"tests/conftest.py FAST_REPRESENTATIVES not collected: {stale}")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
