import pytest

from runner.errors import InputError
from runner.workflows.sweep import CellResult, load_matrix, sweep_exit_code

pytestmark = pytest.mark.unit


def test_matrix_is_the_cartesian_product(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("seed: [1, 2]\nparams.k: [a, b, c]\n")
    cells = load_matrix(m)
    assert len(cells) == 6
    assert cells[0].overrides == {"seed": 1, "params.k": "a"}
    assert cells[-1].label() == "seed=2, params.k=c"


@pytest.mark.parametrize(("text", "message"), [
    ("seed: 3\n", "non-empty list"),
    ("seed: []\n", "non-empty list"),
    ("image: [x]\n", "not supported"),
    ("- 1\n", "mapping"),
])
def test_bad_matrix_names_the_axis(tmp_path, text, message):
    m = tmp_path / "m.yaml"
    m.write_text(text)
    with pytest.raises(InputError, match=message) as exc:
        load_matrix(m)
    assert exc.value.fields["file"] == str(m)


class _Err:
    def __init__(self, code):
        self.exit_code = code
        self.message = "x"


def test_sweep_exit_code_is_the_most_severe():
    def result(code):
        return CellResult(cell=None, outcome=None, error=_Err(code))  # type: ignore[arg-type]

    assert sweep_exit_code([result(0), result(6)]) == 6
    assert sweep_exit_code([result(6), result(3)]) == 3
    assert sweep_exit_code([result(0), result(0)]) == 0
