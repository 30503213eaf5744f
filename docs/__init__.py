"""medvision's documentation, installed beside the package as ``medvision_docs`` so that
``medvision docs`` can show it without a source checkout."""
