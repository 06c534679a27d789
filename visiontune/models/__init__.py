"""See the package docstring of visiontune."""
