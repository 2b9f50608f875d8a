//! The SecAgg+ communication graph (its degree and threshold: [`super::params`]).
//!
//! Each party exchanges keys and shares only with its neighbours in a random
//! k-regular graph (a Harary graph on a random permutation of the parties),
//! so a party's cost grows like k = O(log n) instead of n. The permutation
//! comes from a seed every party and the coordinator agree on (derived from
//! the job and round), so the graph is public and reproducible. Small
//! federations use the complete graph. See `docs/secure-aggregation.md`.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::Error;

/// Neighbourhood structure over parties `0..n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    neighbours: Vec<Vec<usize>>,
}

impl Graph {
    /// The complete graph when `degree >= n − 1`, else a random Harary graph
    /// H(k, n) on the permutation drawn from `seed`. An odd `degree` is
    /// rounded up to even.
    pub fn new(n: usize, degree: usize, seed: [u8; 32]) -> Result<Graph, Error> {
        if n < 2 {
            return Err(Error::InvalidInput(format!("secure aggregation needs at least 2 parties (got {n})")));
        }
        if degree == 0 {
            return Err(Error::InvalidInput("graph degree must be positive".into()));
        }
        if degree >= n - 1 {
            let neighbours = (0..n).map(|i| (0..n).filter(|&j| j != i).collect()).collect();
            return Ok(Graph { neighbours });
        }
        let half = degree.div_ceil(2);
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
        let mut neighbours = vec![Vec::with_capacity(2 * half); n];
        for pos in 0..n {
            let me = perm[pos];
            for d in 1..=half {
                neighbours[me].push(perm[(pos + d) % n]);
                neighbours[me].push(perm[(pos + n - d) % n]);
            }
        }
        for l in &mut neighbours {
            l.sort_unstable();
            l.dedup();
        }
        Ok(Graph { neighbours })
    }

    /// Party `i`'s neighbours, ascending.
    pub fn neighbours(&self, i: usize) -> &[usize] {
        &self.neighbours[i]
    }

    /// Whether `i` and `j` are neighbours.
    pub fn adjacent(&self, i: usize, j: usize) -> bool {
        self.neighbours[i].binary_search(&j).is_ok()
    }

    /// Number of parties.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether there are no parties.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_graphs_are_regular_symmetric_and_seeded() {
        for (n, k) in [(10, 4), (50, 12), (101, 14), (200, 16)] {
            let g = Graph::new(n, k, [7; 32]).unwrap();
            for i in 0..n {
                assert_eq!(g.neighbours(i).len(), k, "n={n} k={k} i={i}");
                assert!(!g.adjacent(i, i));
                for &j in g.neighbours(i) {
                    assert!(g.adjacent(j, i));
                }
            }
            assert_eq!(g, Graph::new(n, k, [7; 32]).unwrap());
            assert_ne!(g, Graph::new(n, k, [8; 32]).unwrap());
        }
    }

    #[test]
    fn a_degree_of_n_minus_1_or_more_is_the_complete_graph() {
        let g = Graph::new(5, 9, [0; 32]).unwrap();
        assert_eq!(g.neighbours(2), &[0, 1, 3, 4]);
        assert!(Graph::new(1, 1, [0; 32]).is_err());
    }
}
