"""The bench's report renders every figure it promises (the GPU run itself cannot run in CI)."""

from job.bench import RECIPES, markdown


def test_markdown_table_has_every_recipe_and_the_checks():
    recipe = {
        "tokens_per_s": 1000.0,
        "mfu": 0.1,
        "peak_gib": 10.0,
        "hours_1k": 0.01,
        "hours_full": 2.0,
        "usd_full": None,
    }
    gen = {
        "prompts": 97,
        "batch": 96,
        "max_new_tokens": 256,
        "tokens_per_s_shared": 1500.0,
        "shared_base_rows_equal_base_alone": 97,
        "tokens_per_s_eager": 800.0,
        "tokens_per_s_stage": 2000.0,
        "tokens_per_s_steady": 5000.0,
        "compile_s": 20.0,
        "static_equals_eager": {"base": 3, "tuned": 4},
        "static_eager_common_prefix_chars": {"base": 100.0, "tuned": 90.0},
        "mean_answer_chars": 900.0,
        "static_tuned_differs_from_base": 97,
    }
    results = {
        "device": "GPU",
        "peak_tflops": 790.0,
        "precision": "bf16",
        "rows": 995,
        "mean_tokens_per_row": 254.0,
        "recipes": {name: dict(recipe, tokens_per_s=1000.0 * (i + 1)) for i, name in enumerate(RECIPES)},
        "equivalence": {
            "loss_packed": 1.0,
            "loss_padded": 1.0,
            "loss_rel_diff": 0.0,
            "grad_cosine": 1.0,
            "grad_rel_l2": 0.0,
        },
        "generation": gen,
        "failed": {"job-sdpa": "RuntimeError: boom"},
    }
    md = markdown(results)
    for name in RECIPES:
        assert f"| {name} |" in md
    assert "| job | 4,000 | 2.00x |" in md  # ratio against (b) trl, the second recipe
    assert "(base rows answer as the base alone, same batch shape: 97/97) | 1,500 |" in md and "| 800 |" in md
    assert "5,000" in md and "Recipe job-sdpa failed: RuntimeError: boom" in md
    assert "LoRA gradient cosine 1.00000" in md
