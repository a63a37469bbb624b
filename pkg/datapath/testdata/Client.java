// A plain Java client, run with default settings (java Client.java HOST PORT
// N): the JVM opens dual-stack AF_INET6 sockets and dials an IPv4 address as
// ::ffff:a.b.c.d. Prints, per connection, the server's name and the peer.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.net.Socket;

public class Client {
    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        int n = Integer.parseInt(args[2]);
        for (int i = 0; i < n; i++) {
            try (Socket s = new Socket()) {
                s.connect(new InetSocketAddress(host, port), 3000);
                s.setSoTimeout(3000);
                BufferedReader r = new BufferedReader(new InputStreamReader(s.getInputStream()));
                System.out.println(r.readLine() + " " + s.getRemoteSocketAddress());
            } catch (Exception e) {
                System.out.println("ERROR " + e);
            }
        }
    }
}
