"""Markup stripping of the packaged texts (tequila_jax.data.corpora.texts)."""

import sys

import pytest

from tequila_jax.data.corpora import texts


def test_rst_keeps_text_and_code_drops_markup():
  rst = """\
.. SPDX-License-Identifier: GPL-2.0

.. _label:

:mod:`functools` --- Higher-order functions
===========================================

.. module:: functools
   :synopsis: Higher-order functions.

.. toctree::
   :maxdepth: 2

   intro
   usage

See :func:`~functools.lru_cache`, :ref:`the guide <guide>`, :rfc:`2104`,
`"memoize" <https://example.org>`_, ``cache()`` and **bold** *text*.

.. note::
   :class: small

   Keep this sentence.

.. versionchanged:: 3.4
   Parameter key can be bytes.

For example::

    >>> f(10)
    3628800
"""
  assert texts.strip_rst(rst) == """\
functools --- Higher-order functions

See lru_cache, the guide, RFC 2104,
"memoize", cache() and bold text.

   Keep this sentence.

Changed in version 3.4:
   Parameter key can be bytes.

For example::

    >>> f(10)
    3628800
"""


def test_pod_codes_and_commands():
  pod = """\
=head1 NAME
X<syntax>

perlsyn - Perl syntax

=over 4

=item * B<free-form> and C<< $a <=> $b >>

See L<perltrap> and L<the FAQ|perlfaq6>, E<lt>tagE<gt>.

=back

=begin html

<p>dropped</p>

=end html

    verbatim C<kept as is>

=cut
"""
  assert texts.strip_pod(pod) == """\
NAME

perlsyn - Perl syntax

free-form and $a <=> $b

See perltrap and the FAQ, <tag>.

    verbatim C<kept as is>
"""


def test_html_text_drops_navigation_keeps_pre():
  page = ("<html><head><title>T</title><style>p {}</style></head><body>"
          "<div class='navheader'><a>Prev</a></div><h2>Title</h2>"
          "<p>Some   <code>code</code>\n text.</p><pre>  x = 1\n  y = 2</pre>"
          "<div class='navfooter'>Next</div></body></html>")
  assert texts.html_text(page) == "Title\n\nSome code text.\n\n  x = 1\n  y = 2\n"


def test_readers_are_named_and_r_data_needs_rdata(monkeypatch, tmp_path):
  assert {"bible_kjv", "austen", "gcide", "jargon", "python_docs",
          "linux_docs", "perl_docs", "postgresql_docs"} <= set(texts.READERS)
  monkeypatch.setitem(sys.modules, "rdata", None)  # as if not installed
  with pytest.raises(texts.TextError, match=r"tequila_jax\[corpus\]"):
    texts.read_lazyload(tmp_path / "Rdata")
