"""The catalogue of bad inputs: each one raises an error of a known type whose message names
the problem and the fix. The README section "Reliability" lists the same catalogue.

Also the inputs that look wrong but are handled: models in train mode, loaders of lists
and of empty batches, spaces of width 1.
"""

import warnings

import pytest
import torch
from conftest import relative_error, state_hash

import graphmerge as gm
from graphmerge.matching_functions import registry
from graphmerge.runtime import on_device

NAN = float("nan")


def inputs(samples: int = 64) -> torch.Tensor:
    return torch.randn(samples, 64, generator=torch.Generator().manual_seed(0))


def loader() -> list[torch.Tensor]:
    x = inputs()
    return [x[:32], x[32:]]


def mlp(seed: int = 0, hidden: tuple[int, ...] = (16, 8)) -> torch.nn.Module:
    return gm.models.build("mlp", hidden=hidden, norm="bn", seed=seed)


def pair() -> list[torch.nn.Module]:
    return [mlp(0), mlp(1)]


def merge(models=None, data=None, *args, **kwargs):
    """gm.merge with the default pair and loader, without progress bars."""
    models = pair() if models is None else models
    return gm.merge(models, loader() if data is None else data, *args, progress=False, **kwargs)


def with_value(key: str, value: float) -> torch.nn.Module:
    """Model 1 of the pair with one entry of ``key`` set to ``value``."""
    model = mlp(1)
    with torch.no_grad():
        model.state_dict()[key].view(-1)[0] = value
    return model


def edited_checkpoint(path, edit) -> None:
    """A checkpoint of an MLP at ``path``, its state_dict changed by ``edit``."""
    gm.save_checkpoint(mlp(), path)
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"])
    torch.save(payload, path)
    gm.load_checkpoint(path)


def truncated_checkpoint(path) -> None:
    gm.save_checkpoint(mlp(), path)
    path.write_bytes(path.read_bytes()[:200])
    gm.load_checkpoint(path)


def wrapped(wrap) -> list[torch.nn.Module]:
    """The pair, model 1 changed by ``wrap`` (a wrapper, a parametrization)."""
    first, second = pair()
    return [first, wrap(second)]


def parametrized(model: torch.nn.Module) -> torch.nn.Module:
    torch.nn.utils.parametrizations.weight_norm(model.layers.fc1)
    return model


def hooked_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch deprecates the hook-based form
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(model.layers.fc1)
    return model


def written(path, content: bytes | None = None):
    """``path`` written with ``content`` (a text file named .pt), or a folder if None."""
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = torch.nn.Linear(64, 8), torch.nn.Linear(8, 2)

    def forward(self, x, y):
        return self.head(torch.relu(self.fc(x) + self.fc(y)))


class DictOutput(torch.nn.Module):
    def __init__(self, key: str = "logits") -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.key = key

    def forward(self, x):
        return {self.key: self.fc(x), "features": x}


class TupleOutput(DictOutput):
    def forward(self, x):
        return self.fc(x), x


def collected_merger() -> gm.Merger:
    merger = gm.Merger(pair(), example_input=inputs(), progress=False)
    merger.collect(loader())
    return merger


# (what is wrong, the call given tmp_path, the error type, a regex its message matches)
CATALOGUE = [
    # the models
    ("one model", lambda _: merge([mlp()]), ValueError, r"merging needs at least 2 models"),
    ("a model, not a list", lambda _: merge(mlp()), ValueError, r"needs at least 2 models"),
    ("not an nn.Module", lambda _: merge([mlp(), None]), TypeError,
     r"model 1 is a NoneType, not an nn.Module"),
    ("different classes", lambda _: merge([mlp(), gm.models.build("resnet20")]), ValueError,
     r"model 1 is a ResNet20 but model 0 is a MLP: merge models of the same architecture"),
    ("different widths", lambda _: merge([mlp(), mlp(1, hidden=(12, 8))]), ValueError,
     r"layers\.fc1\.weight has shape \(12, 64\) in model 1 but \(16, 64\) in model 0: merge "
     r"models of the same architecture and width"),
    ("different depths", lambda _: merge([mlp(), mlp(1, hidden=(16, 8, 8))]), ValueError,
     r"model 1 has different parameters than model 0 \(missing \[\], extra "
     r"\['layers\.fc3\.bias'.*same architecture"),
    ("NaN weight", lambda _: merge([mlp(), with_value("layers.fc1.weight", NAN)]), ValueError,
     r"layers\.fc1\.weight of model 1 contains NaN or Inf values"),
    ("Inf BatchNorm buffer",
     lambda _: merge([mlp(), with_value("layers.norm2.running_var", float("inf"))]),
     ValueError, r"layers\.norm2\.running_var of model 1 contains NaN or Inf values"),
    ("models on two devices",
     lambda _: gm.Merger([mlp(), *on_device([mlp(1)], "meta")], example_input=inputs()),
     ValueError, r"layers\.fc1\.weight is on meta in model 1 but on cpu in model 0: move the "
     r"models to one device, or pass device="),
    # checkpoints
    ("checkpoint missing a key", lambda tmp: edited_checkpoint(
        tmp / "m.pt", lambda state: state.pop("head.bias")), ValueError,
     r"do not fit the architecture: missing keys \(1\): head\.bias"),
    ("checkpoint with an extra key", lambda tmp: edited_checkpoint(
        tmp / "m.pt", lambda state: state.update(extra=torch.zeros(1))), ValueError,
     r"do not fit the architecture: unexpected keys \(1\): extra"),
    ("truncated checkpoint", lambda tmp: truncated_checkpoint(tmp / "m.pt"), ValueError,
     r"m\.pt is not a readable PyTorch file"),
    # the data
    ("empty loader", lambda _: merge(data=[]), ValueError,
     r"the loader yielded no batches: merging needs data"),
    ("only empty batches", lambda _: merge(data=[inputs()[:0]] * 2), ValueError,
     r"the loader yielded no samples: statistics need data"),
    ("dict batches the model does not take",
     lambda _: merge(data=[{"image": inputs(), "label": 0}]), ValueError,
     r"the example input \(image=\(8, 64\) float32\) does not fit MLP: .*unexpected keyword "
     r"argument 'image'\. A dict batch is passed as keyword arguments .*"
     r"graphmerge\.data\.formatted\(loader, function\)"),
    ("dict batches of no tensor", lambda _: merge(data=[{"label": 0}]), ValueError,
     r"the loader yields dicts \(keys 'label'\) without an input tensor"),
    ("batches of no tensor", lambda _: merge(data=[[1.0, 2.0]]), ValueError,
     r"must yield input tensors, \(input, target\) pairs or dicts of keyword inputs; got a "
     r"batch of type list"),
    ("a tensor, not a loader", lambda _: merge(data=inputs()), TypeError,
     r"the loader is a single tensor of shape \(64, 64\).*pass \[tensor\] \(one batch\)"),
    ("not iterable", lambda _: merge(data=5), TypeError,
     r"the loader must be an iterable of batches .*got an object of type int"),
    ("one-shot iterator, read twice", lambda _: merge(data=iter(loader()), normalize="reset"),
     ValueError, r"give a DataLoader or a list of batches, not a one-shot iterator"),
    ("wrong input shape", lambda _: merge(data=[torch.zeros(8, 32)]), ValueError,
     r"the example input \(8, 32\) does not fit MLP: .*Pass batches shaped like the model's "
     r"training data"),
    ("wrong shape in a later batch", lambda _: merge(data=[inputs(), torch.zeros(8, 32)]),
     ValueError, r"the model cannot run on inputs of shape \(8, 32\) and dtype torch\.float32"),
    ("wrong dtype", lambda _: merge(data=[inputs().double()]), ValueError,
     r"The inputs are torch\.float64 but the model's parameters are torch\.float32: convert "
     r"the data"),
    ("NaN features", lambda _: merge(data=[inputs() * NAN]), FloatingPointError,
     r"non-finite features \(NaN or Inf\) in space 'layers\.fc1': check the models' weights "
     r"and the data"),
    ("features overflowing to Inf", lambda _: merge(data=[inputs() * 1e36]), FloatingPointError,
     r"non-finite features \(NaN or Inf\) in space 'layers\.fc1'"),
    ("no samples allowed", lambda _: merge(max_samples=0), ValueError,
     r"max_samples must be a whole number >= 1, got 0"),
    ("a data method without data", lambda _: gm.merge(pair(), None, "permute"), ValueError,
     r"method 'permute' needs a data loader for its feature statistics"),
    # the method and its options
    ("unknown method", lambda _: merge(method="zipp"), ValueError,
     r"unknown matching function 'zipp'; available: cca, identity, .* Did you mean 'zip'\?"),
    ("unknown normalization", lambda _: merge(normalize="repiar"), ValueError,
     r"unknown normalization 'repiar': choose one of reset, repair, rescale"),
    ("normalization without data", lambda _: gm.merge(
        pair(), None, "weight_matching", normalize="repair", example_input=inputs()),
     ValueError, r"normalize='repair' needs data: pass loader="),
    ("unknown hyper-parameter", lambda _: merge(method="zip", alhpa=0.1), ValueError,
     r"matching function 'zip' has no hyper-parameter alhpa; it accepts: merged_width, "
     r"reduction, alpha, beta"),
    ("NaN hyper-parameter", lambda _: merge(method="zip", alpha=NAN), ValueError,
     r"zip on space 'layers\.fc1': zip needs 0 <= alpha <= 1, got nan"),
    ("merged width out of range", lambda _: merge(method="zip", merged_width=100), ValueError,
     r"zip on space 'layers\.fc1': merged_width=100 is outside"),
    ("unknown output", lambda _: merge(output="sum"), ValueError,
     r"output must be one of average, concat, got 'sum'"),
    ("wrong number of weights", lambda _: merge(weights=[0.2, 0.3, 0.5]), ValueError,
     r"got 3 weights for 2 models: give one per model"),
    ("start_at out of range", lambda _: merge(start_at=7), ValueError,
     r"start_at=7 is out of range: this graph has 2 mergeable spaces, so start_at must be an "
     r"index in 0\.\.2 or a space name"),
    ("stop_at negative", lambda _: merge(stop_at=-1), ValueError, r"stop_at=-1 is out of range"),
    ("start_at names no space", lambda _: merge(start_at="fc9"), ValueError,
     r"start_at='fc9' is not a mergeable space; mergeable: layers\.fc1, layers\.fc2"),
    ("start_at after stop_at", lambda _: merge(start_at=2, stop_at=1), ValueError,
     r"start_at=2 \(space 2\) comes after stop_at=1 \(space 1\): no space would be merged"),
    ("merge before collect",
     lambda _: gm.Merger(pair(), example_input=inputs(), progress=False).merge("permute"),
     ValueError, r"method 'permute' needs feature statistics: call collect\(loader\) first"),
    ("a Merger with nothing to trace", lambda _: gm.Merger(pair()), ValueError,
     r"Merger needs a graph or an example_input to trace the models"),
    ("a hyper-parameter of another method", lambda _: collected_merger().merge("cca", alpha=0.5),
     ValueError, r"matching function 'cca' has no hyper-parameter alpha; it accepts: gamma"),
    ("preserve_first k beyond the spaces",
     lambda _: merge(method="preserve_first", k=99), ValueError,
     r"preserve_first k=99 is out of range: the graph has 2 mergeable spaces, so k must be in "
     r"0\.\.2"),
    ("a fractional seed", lambda _: gm.merge(pair(), None, "weight_matching", seed=1.5,
                                             example_input=inputs()),
     ValueError, r"seed must be a whole number >= 0, got 1\.5"),
    ("a width that rounds to nothing", lambda _: gm.models.build("mlp", width_multiplier=1e-9),
     ValueError, r"width_multiplier=1e-09 leaves a layer of 512 units with 5\.12e-07 units"),
    # wrappers and parametrizations
    ("torch.compile", lambda _: merge(wrapped(torch.compile)), ValueError,
     r"model 1 is wrapped by torch\.compile: merge the model inside it, model\._orig_mod"),
    ("DataParallel", lambda _: merge(wrapped(torch.nn.DataParallel)), ValueError,
     r"model 1 is wrapped by DataParallel: merge the model inside it, model\.module"),
    ("weight_norm parametrization", lambda _: merge(wrapped(parametrized)), ValueError,
     r"layer layers\.fc1 of model 1 computes weight through a parametrization .*"
     r"remove_parametrizations\(layer, 'weight'\)"),
    ("hook-based weight_norm", lambda _: merge(wrapped(hooked_weight_norm)), ValueError,
     r"layers\.fc1 of model 1 computes weight with torch\.nn\.utils\.weight_norm: .*"
     r"remove_weight_norm\(layer\)"),
    # more data and files
    ("numpy batches", lambda _: merge(data=[inputs().numpy()]), ValueError,
     r"the loader yields numpy arrays: .*torch\.from_numpy"),
    ("two-input model, data method",
     lambda _: gm.Merger([TwoInputs(), TwoInputs()], example_input=(inputs(), inputs()))
     .collect([inputs()]), ValueError,
     r"the model cannot be called with one input tensor \(.*missing 1 required positional "
     r"argument: 'y'\).*\(\(input1, input2\), target\) pairs"),
    ("dict outputs without logits evaluated",
     lambda _: gm.evaluation.evaluate(DictOutput("scores"), [(inputs(), torch.zeros(64).long())]),
     ValueError, r"the model returns a dict with keys 'scores', 'features', not one tensor"),
    ("tuple outputs in an ensemble",
     lambda _: gm.evaluation.Ensemble([TupleOutput(), TupleOutput()])(inputs()), ValueError,
     r"the model returns a tuple, not one tensor of \(batch, classes\) logits"),
    ("a text file named .pt", lambda tmp: gm.load_checkpoint(written(tmp / "t.pt", b"hello")),
     ValueError, r"t\.pt is not a readable PyTorch file \(KeyError"),
    ("a folder as checkpoint", lambda tmp: gm.load_checkpoint(written(tmp / "d.pt")),
     ValueError, r"d\.pt is a folder, not a checkpoint file"),
    ("a whole model saved with torch.save",
     lambda tmp: (torch.save(mlp(), tmp / "w.pt"), gm.load_checkpoint(tmp / "w.pt")),
     ValueError, r"w\.pt holds pickled Python objects, not only tensors \(a whole model saved "
     r"with torch\.save\(model\)\?\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(call, error, message, id=what) for what, call, error, message in CATALOGUE],
)
def test_bad_input_gets_a_clear_error(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_models_in_train_mode_are_read_in_eval_mode_and_left_as_they_were():
    trained = pair()
    for model in trained:
        model.train()
    trained[0].layers.norm1.eval()  # one submodule in its own mode
    before = [state_hash(model) for model in trained]
    merged = merge(trained, method="permute", normalize="repair")
    assert [state_hash(model) for model in trained] == before  # BatchNorm stats untouched
    assert trained[0].training and not trained[0].layers.norm1.training
    assert trained[1].training and trained[1].layers.norm1.training
    assert state_hash(merge(pair(), method="permute", normalize="repair")) == state_hash(merged)


def test_lists_and_empty_batches_are_read_like_tensors():
    x = inputs()
    expected = state_hash(merge(data=[x[:32], x[32:]]))
    labels = torch.zeros(32, dtype=torch.long)
    assert state_hash(merge(data=[[x[:32], labels], (x[32:], labels)])) == expected
    assert state_hash(merge(data=[[x[:32]], x[:0], [x[32:]]])) == expected


@pytest.mark.filterwarnings("ignore:merging made BatchNorm running variances")  # CCA's sign
@pytest.mark.parametrize("method", ["identity", "permute", "zip", "cca", "weight_matching"])
def test_spaces_of_width_one_merge_by_every_method(method):
    """A layer of one unit is a space of width 1: every method merges it (its only
    matching is the unit with the unit) into a model that runs and stays finite."""
    models = [mlp(seed, hidden=(1, 8)) for seed in (0, 1)]
    merger = gm.Merger(models, example_input=inputs(), progress=False)
    merger.collect(loader())
    result = merger.merge(method)
    match = result.matches["layers.fc1"]
    expected = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    if method != "cca":  # CCA maps model 1's unit by its scale, not 1
        torch.testing.assert_close(match.merge, expected)
    assert match.merge.shape == (1, 2) and match.unmerge.shape == (2, 1)
    with torch.no_grad():
        assert torch.isfinite(result.model.eval()(inputs())).all()


def nan_matrices(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((width, 2 * width), NAN), torch.ones(2 * width, width)


def square_matrices(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(width, width), torch.ones(width, width)


@pytest.mark.parametrize(
    ("returned", "error", "message"),
    [
        (nan_matrices, FloatingPointError, r"broken returned NaN or Inf for space 'layers\.fc1'"),
        (square_matrices, ValueError, r"broken returned merge \(16, 16\) and unmerge \(16, 16\) "
         r"for space 'layers\.fc1'; expected \(d', 32\) and \(32, d'\)"),
    ],
    ids=["NaN", "wrong shapes"],
)  # fmt: skip
def test_a_matching_function_returning_bad_matrices_is_refused(
    returned, error, message, monkeypatch
):
    """Your own matching function is checked like the built-in ones, before any fold."""

    def broken(stats, num_models):
        return returned(stats.mean.shape[0] // num_models)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("broken")(broken)
    with pytest.raises(error, match=message):
        merge(method="broken")


def test_a_model_of_two_inputs_merges_by_weight_matching_on_a_tuple_example():
    models = [TwoInputs(), TwoInputs()]
    x = inputs(16)
    merged = gm.Merger(models, example_input=(x, x), progress=False).merge("weight_matching")
    with torch.no_grad():
        assert merged.model(x, x).shape == (16, 2)


def test_a_model_of_two_inputs_merges_by_data_methods_on_tuple_inputs():
    a = TwoInputs()
    x, y = inputs(16), inputs(16) + 1
    graph = gm.graphs.trace(a, (x, y))
    permuted = graph.permute(graph.random_permutations(3))
    loader = [((x, y), torch.zeros(16).long()), ((x[:5], y[:5]), torch.zeros(5).long())]
    merged = gm.merge([a, permuted], loader, method="permute", normalize="repair", progress=False)
    with torch.no_grad():
        assert relative_error(a(x, y), merged(x, y)) < 1e-5
    assert gm.evaluation.evaluate(merged, loader)["num_samples"] == 21


def test_dict_batches_feed_keyword_inputs_and_dict_outputs_give_their_logits():
    model = DictOutput()
    batches = [{"x": inputs(16), "labels": torch.arange(16) % 10}]
    with torch.no_grad():
        expected = (model.fc(inputs(16)).argmax(1) == batches[0]["labels"]).float().mean()
    metrics = gm.evaluation.evaluate(model, batches)
    assert metrics["accuracy"] == pytest.approx(expected.item())
    ensemble = gm.evaluation.Ensemble([model, model])
    assert torch.allclose(ensemble(x=inputs(4)), model.fc(inputs(4)))


def test_formatted_loaders_turn_any_batch_into_the_models_arguments():
    raw = [{"first": inputs(8), "second": inputs(8), "y": torch.arange(8) % 2}]
    loader = gm.data.formatted(raw, lambda b: ((b["first"], b["second"]), {}, b["y"]))
    assert gm.evaluation.evaluate(TwoInputs(), loader)["num_samples"] == 8
    with pytest.raises(ValueError, match=r"must return \(args, kwargs, target\)"):
        list(gm.data.formatted(raw, lambda b: (b["first"], b["y"])))
