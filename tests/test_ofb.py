"""OFB's library: the bi-mask, expected MACs and latency, progressive pruning with its optimizer state, slicing,
PMIM."""

from __future__ import annotations

import copy
import itertools

import pandas as pd
import pytest
import timm
import torch

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import count_macs, trace_costs
from flora_steps.core.latency import RESIDUAL, SKELETON, StructureTable, measure_structure_table
from flora_steps.pruning.ofb import (
    EMBED,
    BiMask,
    OFBCosts,
    OFBGrids,
    OFBLatency,
    OFBPrice,
    OFBSearch,
    kept_units,
    local_normalise,
    mim_decoder,
    ramp,
    slice_parameter,
    survival,
    timed_structures,
)
from flora_steps.runtime.artifacts import ModelSpec, load_model, save_model

GRIDS = OFBGrids(heads=[0.5, 1.0], head_dim=[0.25, 0.5, 0.75, 1.0], mlp=[0.25, 0.5, 0.75, 1.0], embed=[0.5, 0.75, 1.0])


def search_model(name: str = "vit_digits", grids: OFBGrids = GRIDS) -> tuple[OFBSearch, OFBCosts, torch.Tensor]:
    torch.manual_seed(0)
    vit = timm.create_model(name, num_classes=10).eval()
    costs = OFBCosts.of(vit, trace_costs(vit, (1, 8, 8)))
    return OFBSearch(vit, grids, in_chans=1, target_window=3, seed=0).eval(), costs, torch.randn(4, 1, 8, 8)


def random_logits(search: OFBSearch, seed: int = 1, spread: float = 3.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in search.masks.values():
            mask.logits.copy_(torch.randn(mask.logits.shape, generator=generator) * spread)


def test_the_bimask_at_lambda_one_and_zero_is_its_two_parts() -> None:
    mask = BiMask([8], [[2, 4, 8]], torch.Generator().manual_seed(0))
    assert torch.equal(mask(1.0), mask.scores.sigmoid())
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-1e4, 1e4, -1e4]))  # one-hot on width 4
    prefix = mask(0.0)
    top = mask.scores.detach().topk(4).indices
    assert torch.equal(prefix, torch.zeros(8).index_fill(0, top, 1.0))
    # in between: the mix, with V the survival probability of each unit's rank
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    p = mask.probabilities()
    by_rank = torch.tensor([1.0] * 2 + [1 - p[0].item()] * 2 + [p[2].item()] * 4)
    assert torch.allclose(mask.prefix_mask(), by_rank[mask.ranks()[0]])
    assert torch.allclose(mask(0.3), 0.3 * mask.scores.sigmoid() + 0.7 * mask.prefix_mask())


def test_attention_bimask_ranks_heads_by_summed_scores_then_channels_within_each_head() -> None:
    mask = BiMask([3, 4], [[1, 2, 3], [2, 4]], torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask.scores.copy_(torch.tensor([[0.0, 0.1, 0.2, 0.3], [5.0, 4.0, -1.0, -2.0], [1.0, 1.0, 1.0, 0.9]]))
        mask.logits.copy_(torch.full((3, 2), -1e4))
        mask.logits[1, 0] = 1e4  # two heads, two channels each
    hard = mask(0.0)
    expected = torch.zeros(3, 4)
    expected[1, :2] = 1  # head 1 (largest summed σ(S)), its two best channels
    expected[2, :2] = 1  # head 2, channels 0 and 1 (ties keep the first)
    assert torch.equal(hard, expected)
    heads, channels = kept_units(mask, (2, 2))
    assert heads.tolist() == [1, 2] and channels.tolist() == [[0, 1], [0, 1]]


def test_survival_of_a_joint_grid_sums_the_cells_that_keep_a_position() -> None:
    p = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    grids = [torch.tensor([1, 2]), torch.tensor([1, 3])]
    values = survival(p, grids, [2, 3])
    assert torch.allclose(values[0, 0], torch.tensor(1.0))
    assert torch.allclose(values[1, 0], p[1].sum())  # the second head exists in row 1 only
    assert torch.allclose(values[0, 2], p[:, 1].sum())  # the third channel in column 1 only
    assert torch.allclose(values[1, 2], p[1, 1])


def brute_force_average(search: OFBSearch, price: OFBPrice) -> float:
    """The expected cost summed over every combination of candidate widths, weighted by their probabilities."""
    keys = list(search.masks)
    options = [list(itertools.product(*[range(len(g)) for g in search.masks[k].grids])) for k in keys]
    probabilities = {k: search.masks[k].probabilities().detach() for k in keys}
    average = 0.0
    for cells in itertools.product(*options):
        choice = dict(zip(keys, cells, strict=True))
        weight = 1.0
        for key, cell in choice.items():
            weight *= float(probabilities[key][cell])
        average += weight * price.price(*search.structure(choice))
    return average


def test_expected_macs_equals_the_average_over_every_combination_of_candidates() -> None:
    grids = OFBGrids(heads=[0.5, 1.0], head_dim=[0.5, 1.0], mlp=[0.5, 1.0], embed=[0.5, 1.0])
    search, costs, _ = search_model(grids=grids)
    random_logits(search, spread=1.0)
    assert costs.expected(search).item() == pytest.approx(brute_force_average(search, costs), rel=1e-5)


SMALL_GRIDS = OFBGrids(heads=[0.5, 1.0], head_dim=[0.5, 1.0], mlp=[0.5, 1.0], embed=[0.5, 0.75, 1.0])


@pytest.fixture(scope="module")
def structure_frame() -> pd.DataFrame:
    """OFB's latency table of the digits ViT on SMALL_GRIDS, timed at two of its three embedding widths."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_digits", num_classes=10).eval()
    blocks, skeletons, models = timed_structures(vit, SMALL_GRIDS, trace_costs(vit, (1, 8, 8)), embed_points=2)
    # the model narrowed at the narrowest width: every head, the narrowest channels per head and units
    narrowed, widths = models[32]
    assert list(models) == [32] and set(widths.values()) == {(2, 16, 128)}
    assert narrowed(torch.randn(2, 1, 8, 8)).shape == (2, 10) and narrowed.blocks[0].mlp.fc1.out_features == 128
    images = torch.randn(4, 1, 8, 8)
    return measure_structure_table(vit, blocks, skeletons, images, repeats=3, warmup=1, models=models)


def test_the_structure_table_holds_every_candidate_and_is_linear_between_embedding_widths(structure_frame) -> None:
    frame = structure_frame
    assert sorted(frame.loc[frame["part"] == SKELETON, "embed"]) == [32, 64]  # the ends of 32, 48, 64
    assert sorted(frame.loc[frame["part"] == RESIDUAL, "embed"]) == [32, 64]  # the narrowed and the dense model
    attention = frame[(frame["part"] == "attention") & (frame["layer"] == "blocks.0")]
    assert sorted(zip(attention["embed"], attention["heads"], attention["width"])) == [
        (e, h, d) for e in (32, 64) for h in (1, 2) for d in (16, 32)
    ]
    table = StructureTable.from_frame(frame)
    # the fixed part: the skeleton and the residual, each linear between the timed widths
    assert table.fixed_ms(48) == pytest.approx(sum(table.skeleton.values()) / 2 + sum(table.residual.values()) / 2)
    assert table.model_ms == frame.loc[frame["part"] == "model", "median_ms"].item()
    assert table.dense_ms == pytest.approx(table.model_ms, abs=1e-4)  # the residual makes it the dense model's median
    row = attention[(attention["embed"] == 32) & (attention["heads"] == 1) & (attention["width"] == 16)]
    assert table.attention_ms("blocks.0", 32, 1, 16) == pytest.approx(row["median_ms"].item())
    middle = table.mlp_ms("blocks.2", 48, 128)
    assert middle == pytest.approx((table.mlp_ms("blocks.2", 32, 128) + table.mlp_ms("blocks.2", 64, 128)) / 2)
    # blocks of one shape are timed once: their rows hold the same values
    first, last = (
        frame[(frame["part"] == "mlp") & (frame["layer"] == b)]["median_ms"].tolist() for b in ("blocks.0", "blocks.3")
    )
    assert first == last
    with pytest.raises(ValueError, match="blocks.0.attn with 2 heads of 24 channels is not in the latency table"):
        table.predict_ms(64, {f"blocks.{i}": (2, 24, 256) for i in range(4)})


def test_expected_latency_equals_the_average_over_every_combination_of_candidates(structure_frame) -> None:
    search, _, _ = search_model(grids=SMALL_GRIDS)
    price = OFBLatency(StructureTable.from_frame(structure_frame), search)
    random_logits(search, spread=1.0)
    with torch.no_grad():  # progressive pruning has removed the widest embedding width: the grids lose their ends
        search.masks[EMBED].logits[-1] = -30.0
    assert search.prune(0.5, None)
    assert price.expected(search).item() == pytest.approx(brute_force_average(search, price), rel=1e-5)
    # and it is differentiable in the width logits
    price.expected(search).backward()
    assert search.masks[EMBED].logits.grad is not None


def test_a_cut_by_predicted_latency_lands_in_the_band(structure_frame) -> None:
    search, _, _ = search_model(grids=SMALL_GRIDS)
    table = StructureTable.from_frame(structure_frame)
    price = OFBLatency(table, search)
    random_logits(search)
    chosen = price.price(*search.structure(search.choice()))
    smallest = search.smallest_cost(price)
    high = (chosen + smallest) / 2
    cells = search.cut_to_budget(price, high - 0.1 * table.dense_ms, high)
    assert high - 0.1 * table.dense_ms <= price.price(*search.structure(cells)) <= high
    with pytest.raises(ValueError, match=r"ms\) lands in"):
        search.cut_to_budget(price, 0.0, smallest / 2)


def test_the_cost_model_counts_what_flop_counter_counts_on_every_sliced_structure() -> None:
    for name in ("vit_digits", "vit_digits_hybrid"):
        search, costs, _ = search_model(name)
        dense = search.structure({k: tuple(len(g) - 1 for g in m.grids) for k, m in search.masks.items()})
        assert costs.structure_macs(*dense) == count_macs(search.vit, (1, 8, 8))
        random_logits(search)
        vit, embed, structure = search.finalise(search.choice())
        assert count_macs(vit, (1, 8, 8)) == costs.structure_macs(embed, structure)


@pytest.mark.parametrize("name", ["vit_digits", "vit_digits_hybrid"])
def test_sliced_model_equals_the_masked_model_with_hard_masks(name: str) -> None:
    search, _, images = search_model(name)
    random_logits(search)
    search.weight = 0.0  # hard: every mask is its prefix of the one live candidate
    cells = search.choice()
    for key, cell in cells.items():
        search.masks[key].alive.zero_()
        search.masks[key].alive[cell] = True
    with torch.no_grad():
        masked = search(images)
    vit, _, _ = search.finalise(cells)
    with torch.no_grad():
        assert torch.allclose(vit.eval()(images), masked, atol=1e-5)


def test_folding_keeps_the_soft_score_part_of_the_units_that_stay() -> None:
    search, _, images = search_model()
    random_logits(search)
    search.weight = 0.4
    cells = search.choice()
    for key, cell in cells.items():  # what pruning leaves at the end of a search: only the chosen widths
        mask = search.masks[key]
        mask.alive.zero_()
        mask.alive[cell] = True
        search._slice(key, mask.widths(cell), None)
    with torch.no_grad():
        masked = search(images)
    vit, _, _ = search.finalise(cells)
    with torch.no_grad():
        assert torch.allclose(vit.eval()(images), masked, atol=1e-5)


def test_a_sliced_model_round_trips_through_its_artifact(tmp_path) -> None:
    search, _, images = search_model()
    random_logits(search)
    vit, embed, structure = search.finalise(search.choice())
    spec = ModelSpec(model="vit_digits", model_kwargs={"num_classes": 10}, pruned=structure, embed_dim=embed)
    save_model(tmp_path / "model", vit, spec)
    loaded, _ = load_model(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), vit(images))
    assert isinstance(loaded, timm.models.vision_transformer.VisionTransformer) and loaded.embed_dim == embed


def test_progressive_pruning_kills_improbable_candidates_and_slices_what_none_keeps() -> None:
    search, _, _ = search_model()
    mlp = search.masks["blocks_0__mlp"]
    with torch.no_grad():
        mlp.logits.copy_(torch.tensor([3.0, 3.0, 0.0, -3.0]))  # widths 64, 128 likely; 192, 256 not
    assert search.prune(0.2, None)
    assert mlp.alive.tolist() == [True, True] and mlp.grid0.tolist() == [64, 128]
    assert search.blocks["blocks.0"].mlp.fc1.out_features == 128 and mlp.scores.shape == (128,)
    assert not search.prune(0.2, None)  # nothing below the threshold now
    assert search.masks[EMBED].live == 3


def test_one_step_after_slicing_is_the_step_of_the_unsliced_model_on_the_kept_units() -> None:
    search, _, images = search_model()
    search.train()
    optimizer = torch.optim.AdamW(search.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        logits, reconstruction = search(images, torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) < 0.3)
        (logits.square().mean() + reconstruction).backward()
        optimizer.step()
    twin = copy.deepcopy(search)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    mask = search.masks["blocks_1__mlp"]
    kept = kept_units(mask, (128,))[0]
    search._slice("blocks_1__mlp", (128,), optimizer)
    generator = torch.Generator().manual_seed(2)
    twin_grads = {name: torch.randn(p.shape, generator=generator) for name, p in twin.named_parameters()}
    restricted = {
        "blocks.1.mlp.fc1.weight": lambda g: g[kept],
        "blocks.1.mlp.fc1.bias": lambda g: g[kept],
        "blocks.1.mlp.fc2.weight": lambda g: g[:, kept],
        "masks.blocks_1__mlp.scores": lambda g: g[kept],
        "masks.blocks_1__mlp.logits": lambda g: g[:2],
    }
    for name, parameter in twin.named_parameters():
        parameter.grad = twin_grads[name]
    for name, parameter in search.named_parameters():
        key = name.removeprefix("vit.")
        parameter.grad = restricted.get(key, lambda g: g)(twin_grads[name])
    optimizer.step()
    twin_optimizer.step()
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in search.named_parameters():
        expected = restricted.get(name.removeprefix("vit."), lambda t: t)(twin_parameters[name].detach())
        assert torch.allclose(parameter.detach(), expected, atol=1e-7), name
        state = optimizer.state[parameter]
        twin_state = twin_optimizer.state[twin_parameters[name]]
        take = restricted.get(name.removeprefix("vit."), lambda t: t)
        assert torch.allclose(state["exp_avg_sq"], take(twin_state["exp_avg_sq"]), atol=1e-9), name
        assert torch.equal(state["step"], twin_state["step"])


def test_slice_parameter_gathers_a_two_axis_parameter_and_its_state() -> None:
    module = torch.nn.Module()
    module.scores = torch.nn.Parameter(torch.arange(12.0).view(3, 4))
    optimizer = torch.optim.AdamW([module.scores], lr=0.1)
    module.scores.grad = torch.ones(3, 4)
    optimizer.step()
    heads, channels = torch.tensor([0, 2]), torch.tensor([[1, 3], [0, 2]])
    old_values, old_state = module.scores.detach().clone(), optimizer.state[module.scores]["exp_avg"].clone()
    slice_parameter(module, "scores", lambda s: s[heads].gather(1, channels), optimizer)
    assert torch.equal(module.scores.detach(), old_values[heads].gather(1, channels))
    assert optimizer.param_groups[0]["params"] == [module.scores]
    assert torch.equal(optimizer.state[module.scores]["exp_avg"], old_state[heads].gather(1, channels))


def test_a_cut_narrows_by_importance_into_the_band() -> None:
    search, costs, _ = search_model()
    random_logits(search)
    dense = float(costs.macs(64, {n: (64, 256) for n in costs.tokens}))
    chosen = costs.structure_macs(*search.structure(search.choice()))
    assert search.cut_to_budget(costs, 0.0, chosen) == search.choice()  # at or below its budget: no cut
    for budget in (0.15, 0.2, 0.25):
        assert budget * dense < chosen
        cells = search.cut_to_budget(costs, (budget - 0.02) * dense, budget * dense)
        assert (budget - 0.02) * dense <= costs.structure_macs(*search.structure(cells)) <= budget * dense
        assert all(c <= chosen for key, cell in cells.items() for c, chosen in zip(cell, search.choice()[key]))
    with pytest.raises(ValueError, match="no narrowing of the searched widths"):
        search.cut_to_budget(costs, 0.0, 0.001 * dense)


def test_the_cut_removes_the_least_important_units_first() -> None:
    search, costs, _ = search_model(grids=OFBGrids(heads=[1.0], head_dim=[1.0], mlp=[0.5, 1.0], embed=[1.0]))
    with torch.no_grad():
        for key, mask in search.masks.items():
            mask.logits.fill_(0.0)
            mask.logits[-1] = 10.0  # every module chooses its widest
            mask.scores.fill_(5.0 if key.startswith("blocks_0") else -5.0)  # block 0's MLP units matter most
    dense = costs.structure_macs(*search.structure(search.choice()))
    one_mlp_halved = dense - costs.structure_macs(*search.structure({**search.choice(), "blocks_0__mlp": (0,)}))
    cells = search.cut_to_budget(costs, dense - 1.5 * one_mlp_halved, dense - 0.5 * one_mlp_halved)
    narrowed = [key for key, cell in cells.items() if cell != search.choice()[key]]
    assert len(narrowed) == 1 and narrowed[0] != "blocks_0__mlp"


def test_a_module_that_decides_freezes_its_lambda() -> None:
    search, _, images = search_model()
    with torch.no_grad():
        for mask in search.masks.values():
            mask.logits.fill_(-30.0).view(-1)[mask.logits.numel() // 2] = 30.0  # all but one improbable
    search.weight = 0.6
    search.prune(0.99, None)
    assert search.decided and search.undecided() == 0
    for mask in search.masks.values():
        assert float(mask.frozen_weight) == pytest.approx(0.6)
    search.weight = 0.1  # the schedule moves on; decided modules keep their λ
    mask = search.masks["blocks_0__mlp"]
    assert torch.allclose(mask(0.1), 0.6 * mask.scores.sigmoid() + 0.4)
    frozen = search(images)
    model, _, _ = search.finalise(search.choice())
    assert torch.allclose(model(images), frozen, atol=1e-5)  # the sliced model is the decided masked model


def test_the_onehot_loss_has_a_gradient_at_a_near_uniform_start() -> None:
    mask = BiMask([64], [list(range(8, 65, 4))], torch.Generator().manual_seed(0))  # 15 candidates
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(0, 0.05, 15))  # ρ far below 0.01
    live = mask.probabilities()
    assert ((live - live.mean()) ** 2).sum() / (1 - 1 / 15) < 1e-3
    mask.onehot_loss().backward()
    assert mask.logits.grad.abs().max() > 0


@pytest.mark.parametrize(("name", "shape"), [("vit_digits", (1, 8, 8)), ("deit_tiny_patch16_224", (3, 224, 224))])
def test_the_pmim_decoder_reconstructs_an_image_from_the_patch_tokens(name: str, shape: tuple[int, ...]) -> None:
    vit = timm.create_model(name, num_classes=10)
    grid = vit.patch_embed.grid_size
    decoder = mim_decoder(vit.embed_dim, shape[0], shape[1] // grid[0])
    tokens = torch.randn(2, vit.embed_dim, *grid)
    assert decoder(tokens).shape == (2, *shape)
    if name == "vit_digits":
        search = OFBSearch(vit, GRIDS, in_chans=1, target_window=3, seed=0).train()
        token_mask = torch.zeros(2, 16, dtype=torch.bool)
        token_mask[:, :4] = True
        logits, loss = search(torch.randn(2, *shape), token_mask)
        assert logits.shape == (2, 10) and loss.ndim == 0 and loss > 0
        loss.backward()
        assert search.mask_token.grad.abs().sum() > 0 and search.decoder[0].weight.grad.abs().sum() > 0


def test_local_normalisation_and_the_schedules() -> None:
    flat = torch.full((1, 1, 8, 8), 3.0)
    assert torch.allclose(local_normalise(flat, 3), torch.zeros_like(flat))
    image = torch.randn(1, 3, 16, 16)
    normalised = local_normalise(image, 5)
    assert normalised.shape == image.shape and torch.isfinite(normalised).all()
    for row, column in ((0, 0), (1, 14), (8, 8), (15, 3)):  # corners, edges and inside: the neighbours in the image
        patch = image[0, :, max(row - 2, 0) : row + 3, max(column - 2, 0) : column + 3].reshape(3, -1)
        expected = (image[0, :, row, column] - patch.mean(1)) / (patch.var(1) + 1e-6).sqrt()
        assert torch.allclose(normalised[0, :, row, column], expected, atol=1e-4)
    assert ramp(0.0, 10, 0.99, 0.1) == 0.99 and ramp(5, 10, 0.99, 0.1) == pytest.approx(0.545)
    assert ramp(12, 10, 0.05, 0.25) == 0.25


def test_the_onehot_loss_falls_as_the_distribution_sharpens() -> None:
    mask = BiMask([8], [[2, 4, 6, 8]], torch.Generator().manual_seed(0))
    values = []
    for sharpness in (0.1, 1.0, 3.0, 10.0):
        with torch.no_grad():
            mask.logits.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]) * sharpness)
        values.append(float(mask.onehot_loss()))
    assert values == sorted(values, reverse=True)


def test_models_that_are_not_plain_vits_are_refused() -> None:
    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match="VisionTransformer"):
        OFBSearch(swin, GRIDS, 3, 3, 0)
