"""One file per op: a torch reference, a fast path where the hardware has one, and one public function."""
