"""M-BEIR benchmark: readers of the released file layout."""
