"""Optional parts of raybm say which extra to install when it is missing."""

import pytest

from raybm.errors import RaybmError
from raybm.extras import EXTRAS, missing_modules, require


def test_an_installed_extra_passes_and_a_missing_module_is_named_with_the_pip_line():
    for extra in EXTRAS:  # make test installs every extra
        require(extra, f"the {extra} check")
    with pytest.raises(RaybmError, match=r"raybm serve needs no_such_module_x, .*pip install 'raybm\[serve\]'"):
        require("serve", "raybm serve", ("fastapi", "no_such_module_x"))


def test_a_submodule_of_a_missing_package_counts_as_missing():
    assert missing_modules(("no_such_package_y.sub", "json")) == ["no_such_package_y.sub"]
