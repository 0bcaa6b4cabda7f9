# Test certificates made with openssl: `make_test_certs DIR` writes a CA (ca.pem, ca.key), a server
# certificate for localhost (localhost.pem, localhost.key) and a client certificate (client.pem, client.key),
# each valid for a day.
make_test_certs() {
  (
    cd "$1"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca 2>/dev/null
    for name in localhost client; do
      openssl req -newkey rsa:2048 -nodes -keyout $name.key -out $name.csr -subj /CN=$name 2>/dev/null
      printf 'subjectAltName=DNS:%s\n' $name >$name.ext
      openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $name.pem -days 1 \
        -extfile $name.ext 2>/dev/null
    done
  )
}
