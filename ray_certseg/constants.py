"""Constants more than one module needs, stated once."""

#: family-wise corrections of the per-pixel tests of one image (``certify.certify``)
CORRECTIONS = ("holm", "bonferroni")
#: the largest vote count and class id a uint16 column holds (n, num_classes, label ids)
MAX_UINT16 = 65535
#: the most classes whose labels fit uint8 with 255 left for the ignore label
UINT8_LABEL_CLASSES = 254
