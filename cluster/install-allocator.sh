#!/bin/sh
# tcmalloc for training (`train.allocator: auto` preloads it where installed): PyTorch's CPU tensors
# come from malloc, and glibc's leaves the freed activations of each step as holes the next step's
# tensors cannot reuse, which costs ~0.7 GB of peak memory on the 135M demo. No PyPI package ships
# tcmalloc, so it comes from the system's package manager where this installer may use it (root and
# apt-get); elsewhere it says what to run and training uses glibc's malloc. Either way it says which.
set -eu
PACKAGE=libtcmalloc-minimal4
if ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so'; then
    echo "allocator: tcmalloc is installed; training preloads it (train.allocator: auto)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "allocator: installing $PACKAGE (Debian) for training (train.allocator: auto)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null 2>&1; }; then
        echo "allocator: tcmalloc installed; training preloads it"
    else
        echo "allocator: $PACKAGE could not be installed; training uses glibc's malloc (more peak memory)"
    fi
else
    echo "allocator: tcmalloc is not installed; training uses glibc's malloc (more peak memory)."
    echo "allocator: to train on tcmalloc, install it as root: apt-get install $PACKAGE (Debian/Ubuntu), dnf install gperftools-libs (Fedora)"
fi
